from pathlib import Path

import pytest
import yaml

from refvg.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_repo_params_parse_and_cover_every_section():
    cfg = load_config(ROOT / "params.yaml")
    assert "transvg" in cfg.methods and cfg.methods["transvg_blind"].language_blind
    # params.yaml lists every knob (DVC tracks params by key, so a missing one would go untracked)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(Config.model_fields)
    for section in ("data", "train", "eval", "synthetic"):
        assert set(raw[section]) == set(Config.model_fields[section].annotation.model_fields), section


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
    cfg = load_config(write(tmp_path, {"methods": {
        "a": {"model": "transvg", "overrides": {"train": {"epochs": 3}}},
        "b": {"model": "transvg", "overrides": {"train": {"nope": 1}}}}}))
    assert cfg.for_method("a").train.epochs == 3
    assert cfg.for_method("a").train.lr == cfg.train.lr
    with pytest.raises(ConfigError, match=r"methods\.b\.overrides"):
        cfg.for_method("b")
    with pytest.raises(ConfigError, match="unknown method 'c'"):
        cfg.for_method("c")
