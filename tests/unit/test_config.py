from pathlib import Path

import pytest
import yaml

from refvg.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, data) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_repo_params_parse_and_cover_every_section():
    cfg = load_config(ROOT / "params.yaml")
    assert "transvg" in cfg.methods and cfg.controls["transvg_blind"].language_blind
    assert not set(cfg.controls) & set(cfg.all_methods)  # dvc.yaml trains all_methods only
    # params.yaml lists every knob (DVC tracks params by key, so a missing one would go untracked)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(Config.model_fields) - {
        "method"
    }  # `method` is set by for_method, per run
    for section in ("data", "train", "eval", "synthetic", "model"):
        assert set(raw[section]) == set(Config.model_fields[section].annotation.model_fields), (
            section
        )
    # each family's knobs are listed in full in one method entry (`dvc exp run -S
    # methods.<m>.config.<knob>=...` needs the key to exist); its ablations inherit them by `base:`
    from refvg.models import config_class

    for model in {m.model for m in cfg.all_methods.values()}:
        full = [
            name
            for name, entry in {
                **raw["methods"],
                **raw["distill_methods"],
                **raw["controls"],
            }.items()
            if entry.get("model") == model and "base" not in entry
        ]
        assert full, model
        listed = set(raw["methods"].get(full[0], raw["distill_methods"].get(full[0]))["config"])
        inherited = {
            "transvg": set(),
            "qrnet": {"l1_weight", "giou_weight", "attention_weight"},
            "epmvg": {"l1_weight", "giou_weight", "attention_weight"},
        }.get(model, set())
        assert listed | inherited == set(config_class(model).model_fields), model


def test_family_config_is_typed_and_dumped_per_method():
    from refvg.models.mattnet_config import MAttNetConfig

    cfg = load_config(ROOT / "params.yaml")
    run = cfg.for_method("mattnet_no_erase")
    assert isinstance(run.family, MAttNetConfig) and run.family.erase.type == "none"
    assert run.model_dump(mode="json")["method"]["config"]["erase"]["type"] == "none"
    assert cfg.for_method("mattnet_erase").family.erase.type == "both"
    assert "loss" not in cfg.train.model_fields and not hasattr(cfg.model, "mattnet")


def test_reading_params_imports_no_model():
    # every family config is validated, but from its torch-free `<family>_config.py`: a config-only
    # tool (the resolve stage, `refvg resolve`) must not pay for importing torch and the models
    import subprocess
    import sys

    code = (
        "import sys; from refvg.config import load_config; "
        f"c = load_config({str(ROOT / 'params.yaml')!r}); "
        "assert type(c.methods['qrnet'].config).__name__ == 'QRNetConfig'; "
        "heavy = ('torch', 'transformers', 'refvg.models.base'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_controls_are_methods_the_pipeline_does_not_train(tmp_path):
    from tests.helpers import tiny_params

    raw = tiny_params()
    raw["controls"] = {"ctl": {"base": "transvg", "image_blind": True}}
    cfg = Config.model_validate(raw)
    assert "ctl" not in cfg.all_methods and cfg.table_of("ctl") == "controls"
    run = cfg.for_method("ctl")  # runnable like any method, its base from another table
    assert run.method.image_blind and run.method.model == "transvg"
    raw["controls"] = {"transvg": {"model": "transvg"}}
    with pytest.raises(ValueError, match="'transvg' declared in both methods and controls"):
        Config.model_validate(raw)


def test_base_inherits_the_whole_entry_and_states_what_differs(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            {
                "methods": {
                    "a": {
                        "model": "mattnet",
                        "config": {"d_model": 32, "erase": {"type": "both", "rate": 0.5}},
                        "overrides": {"train": {"epochs": 3}},
                    },
                    "b": {"base": "a", "config": {"erase": {"type": "none"}}},
                    "c": {"base": "b", "overrides": {"train": {"lr": 0.01}}},
                }
            },
        )
    )
    b, c = cfg.for_method("b"), cfg.for_method("c")
    assert b.family.d_model == 32 and b.family.erase.type == "none" and b.family.erase.rate == 0.5
    assert b.train.epochs == 3 and cfg.methods["b"].model == "mattnet"
    assert c.family.erase.type == "none" and c.train.epochs == 3 and c.train.lr == 0.01
    assert cfg.for_method("a").family.erase.type == "both"  # the base itself is unchanged


def test_base_may_name_a_distill_method(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            {
                "methods": {"off": {"base": "on", "config": {"image_weight": 0.0}}},
                "distill_methods": {
                    "on": {"model": "epmvg", "config": {"image_weight": 0.3, "text_weight": 0.2}}
                },
            },
        )
    )
    assert (
        cfg.for_method("off").family.image_weight == 0.0
        and cfg.for_method("off").family.text_weight == 0.2
    )


@pytest.mark.parametrize(
    "methods, match",
    [
        ({"a": {"base": "b"}, "b": {"base": "a"}}, r"methods\.(a|b)\.base: cycle of bases"),
        ({"a": {"base": "a"}}, r"methods\.a\.base: cycle"),
        (
            {"a": {"model": "transvg"}, "b": {"base": "nope"}},
            r"methods\.b\.base: unknown method 'nope'",
        ),
        (
            {"a": {"model": "transvg"}, "b": {"base": "a", "model": "cmsa"}},
            r"methods\.b\.model: 'cmsa' contradicts its base 'a'",
        ),
        (
            {"weak_cam": {"model": "weak_cam", "config": {"minig_weight": 0.5}}},
            r"methods\.weak_cam\.config\.minig_weight: Extra inputs are not permitted",
        ),
        (
            {"a": {"model": "mattnet"}, "b": {"base": "a", "config": {"erase": {"tpye": "none"}}}},
            r"methods\.b\.config\.erase\.tpye",
        ),
        ({"a": {"model": "no_such_model"}}, r"methods\.a\.model: unknown model 'no_such_model'"),
        (
            {"a": {"model": "transvg", "overrides": {"model": {"mattnet": {"d_model": 8}}}}},
            r"model\.mattnet",
        ),
    ],
)
def test_bad_method_entries_are_rejected_with_the_key_path(tmp_path, methods, match):
    with pytest.raises(ConfigError, match=match):
        cfg = load_config(write(tmp_path, {"methods": methods}))
        for name in cfg.methods:
            cfg.for_method(name)


def test_method_is_not_a_params_key(tmp_path):
    with pytest.raises(ConfigError, match="method: is what Config.for_method sets"):
        load_config(write(tmp_path, {"method": {"model": "transvg"}}))


def test_unknown_key_is_rejected_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        load_config(write(tmp_path, {"train": {"lrr": 0.1}}))


def test_wrong_type_is_rejected_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(write(tmp_path, {"train": {"epochs": "many"}}))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such params file"):
        load_config(tmp_path / "missing.yaml")


def test_method_overrides_merge_and_are_validated(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            {
                "methods": {
                    "a": {"model": "transvg", "overrides": {"train": {"epochs": 3}}},
                    "b": {"model": "transvg", "overrides": {"train": {"nope": 1}}},
                }
            },
        )
    )
    assert cfg.for_method("a").train.epochs == 3
    assert cfg.for_method("a").train.lr == cfg.train.lr
    with pytest.raises(ConfigError, match=r"methods\.b\.overrides"):
        cfg.for_method("b")
    with pytest.raises(ConfigError, match="unknown method 'c'"):
        cfg.for_method("c")


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n",
            r"(?s)duplicate key 'lr'.*params.yaml\", line 4",
        ),  # YAML keeps the last silently
        ("train:\n  epochs: yes\n", r"train\.epochs: .*expected a number, got the boolean true"),
        ("train:\n  num_workers: off\n", r"train\.num_workers: .*boolean false"),
        ("train:\n  lr: .inf\n", r"train\.lr: Input should be a finite number"),
        ("train:\n  grad_clip: .nan\n", r"train\.grad_clip: Input should be a finite number"),
        (
            "model:\n  visual:\n    hidden_sizes: [32, big, 128]\n",
            r"model\.visual\.hidden_sizes\.1",
        ),
        (
            "model:\n  fusion:\n    readout_radius: on\n",
            r"model\.fusion\.readout_radius: .*boolean",
        ),
        ("data:\n  dataset: null\n", r"data\.dataset: Input should be a valid string"),
        (
            "methods:\n  m:\n    model: transvg\n    language_blind: 2\n",
            r"methods\.m\.language_blind",
        ),
        ("train: 5\n", r"train: Input should be a valid dictionary"),
        ("synthetic:\n  min_objects: 4\n  max_objects: 2\n", r"max_objects must be >= min_objects"),
    ],
)
def test_hostile_params_are_rejected_with_the_key_named(tmp_path, text, match):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_params_that_are_not_utf8_text(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_bytes(b"train:\n  lr: 0.1 # caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(p)


def test_yaml_spellings_that_mean_the_right_thing_still_parse(tmp_path):
    # Guards the checks above from rejecting good files: 1e-3 is a string to YAML 1.1, null is
    # allowed here.
    cfg = load_config(
        write(
            tmp_path,
            {
                "train": {"lr": "1e-3", "compile": True},
                "model": {"fusion": {"readout_radius": None}},
            },
        )
    )
    assert (
        cfg.train.lr == 0.001
        and cfg.train.compile is True
        and cfg.model.fusion.readout_radius is None
    )


def test_a_pretrained_folder_the_pretrain_stage_does_not_write_is_refused():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["pretrain"]["models"] = ["resnet", "swin"]  # no text encoder pretrained
    with pytest.raises(ConfigError) as err:
        load_config_from(raw)
    assert "model.text.pretrained: data/pretrained/text is the pretrain stage's" in str(err.value)
    raw["model"]["text"]["pretrained"] = None  # from scratch: nothing asked of the stage
    assert load_config_from(raw).pretrain.models == ("resnet", "swin")


def load_config_from(raw: dict) -> Config:
    from refvg.config import _validate

    return _validate(raw, source="params.yaml")
