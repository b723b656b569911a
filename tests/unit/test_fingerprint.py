"""The per-method stamps of the `resolve` stage (refvg.engine.fingerprint): a stamp changes with
what its method's training reads, and with nothing else; it is rewritten only when it changes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import yaml

from refvg.config import Config, ConfigError, load_config
from refvg.engine.fingerprint import method_stamp, training_sources, write_stamps
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(ROOT / "params.yaml")  # every method


def edited(cfg: Config, dotted: str, value) -> Config:
    """params.yaml as written (bases unresolved) with one value changed, then read as refvg reads
    it."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    *parents, leaf = dotted.split(".")
    section = raw
    for key in parents:
        section = section.setdefault(key, {})
    section[leaf] = value
    return Config.model_validate(raw)


def changed_stamps(cfg: Config, dotted: str, value) -> set[str]:
    after = edited(cfg, dotted, value)
    # every declared method, the controls too (compare.py's resume key holds their stamps)
    return {m for m in cfg.declared_methods if method_stamp(after, m) != method_stamp(cfg, m)}


def test_a_stamp_changes_with_what_its_training_reads_only(cfg):
    everyone = set(cfg.declared_methods)
    mattnets = {m for m, e in cfg.declared_methods.items() if e.model == "mattnet"}
    assert len(mattnets) == 4 and set(cfg.distill_methods) == {"epmvg"}
    for dotted, value in [
        ("eval.num_qualitative", 3),
        ("eval.iou_thresholds", [0.5]),
        ("storage.prefix", "x"),
        ("tracking.experiment", "x"),
        ("synthetic.seed", 7),
        ("teacher.epochs", 1),
        ("train.checkpoint_every_steps", 7),
        ("detections.jitter", 0.2),
        ("parallel.prepare_shards", 2),
    ]:
        assert changed_stamps(cfg, dotted, value) == set(), dotted
    assert changed_stamps(cfg, "train.seed", 5) == everyone
    own_lr = {m for m, e in cfg.declared_methods.items() if "lr" in e.overrides.get("train", {})}
    assert own_lr == {"cmsa", "cmsa_concat"}  # cmsa sets its own, cmsa_concat inherits it
    assert changed_stamps(cfg, "train.lr", 0.5) == everyone - own_lr
    assert changed_stamps(cfg, "data.max_tokens", 7) == everyone
    image_blind = {m for m, e in cfg.declared_methods.items() if e.image_blind}
    assert image_blind == {"transvg_image_blind"}
    assert changed_stamps(cfg, "controls.transvg_image_blind.image_blind", False) == image_blind
    assert changed_stamps(cfg, "model.visual.embed_dim", 16) == everyone
    assert changed_stamps(cfg, "methods.mattnet_erase.config.erase.rate", 0.5) == mattnets
    cmsas = {"cmsa", "cmsa_concat"}  # cmsa_concat: `base: cmsa`, so it inherits the edit
    assert changed_stamps(cfg, "methods.cmsa.config.num_layers", 2) == cmsas
    assert changed_stamps(cfg, "controls.cmsa_concat.config.fusion", "self_attention") == {
        "cmsa_concat"
    }
    assert changed_stamps(cfg, "teacher.projection_dim", 32) == {
        "epmvg"
    }  # the student projects into it
    assert changed_stamps(cfg, "methods.cmsa.overrides", {"train": {"epochs": 9}}) == cmsas


def test_training_sources_are_the_model_and_what_training_imports():
    cmsa, mattnet = training_sources("cmsa"), training_sources("mattnet")
    shared = {
        "refvg/engine/trainer.py",
        "refvg/stages/train.py",
        "refvg/data/dataset.py",
        "refvg/models/backbones.py",
        "refvg/config.py",
        "refvg/engine/evaluator.py",
    }
    assert shared <= set(cmsa) & set(mattnet)
    assert "refvg/models/cmsa.py" in cmsa and "refvg/models/cmsa.py" not in mattnet
    assert "refvg/models/mattnet.py" in mattnet and "refvg/models/mattnet.py" not in cmsa
    # a family's config module (torch-free, registered by name) is part of what its training reads
    assert "refvg/models/cmsa_config.py" in cmsa and "refvg/models/cmsa_config.py" not in mattnet
    assert "refvg/models/qrnet_config.py" in training_sources("qrnet")
    assert "refvg/models/cmsa.py" not in training_sources(
        "weak_cam"
    )  # shared helpers live in layers.py
    assert "refvg/models/layers.py" in training_sources("weak_cam")
    # Not run by training: the other stages' code, the package's lazy __init__.
    for other in (
        "refvg/visualize.py",
        "refvg/reporting.py",
        "refvg/models/clip_teacher.py",
        "refvg/data/synthetic.py",
        "refvg/models/__init__.py",
        "refvg/tracking.py",
    ):
        assert other not in cmsa, other
    assert (
        cmsa["refvg/models/cmsa.py"]
        == hashlib.sha256((ROOT / "refvg/models/cmsa.py").read_bytes()).hexdigest()[:16]
    )
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        training_sources("nope")


def test_stamps_are_rewritten_only_when_they_change(cfg, tmp_path):
    first = write_stamps(cfg, tmp_path)
    assert first == dict.fromkeys(cfg.all_methods, True)
    text = (tmp_path / "cmsa.json").read_text()
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"
    for path in tmp_path.glob("*.json"):
        os.utime(path, ns=(0, 0))
    (tmp_path / "gone.json").write_text("{}")  # a method no longer declared

    again = write_stamps(edited(cfg, "methods.cmsa.config.num_layers", 2), tmp_path)
    cmsas = {
        "cmsa"
    }  # cmsa_concat inherits the edit, but controls get no stamp: dvc.yaml skips them
    assert set(again) == set(cfg.all_methods) and "cmsa_concat" in cfg.controls
    assert {m for m, changed in again.items() if changed} == cmsas
    touched = {p.stem for p in tmp_path.glob("*.json") if p.stat().st_mtime_ns != 0}
    assert touched == cmsas and not (tmp_path / "gone.json").exists()
