"""Shared fixtures: a tiny configuration, and a tiny generated + prepared dataset built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from refvg.tracking import disable_telemetry

disable_telemetry()
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole pipeline runs in seconds per stage on 2 CPU cores, same code paths as the default.
TINY = {
    "synthetic": {"num_images": 48, "image_size": 64, "seed": 0},
    "data": {"image_size": 64},
    "model": {
        "visual": {"hidden_sizes": [16, 32, 64], "depths": [1, 1, 1]},
        "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "vocab_size": 200},
        "fusion": {"d_model": 64, "num_layers": 1, "num_heads": 2, "ffn_dim": 128},
    },
    "train": {"epochs": 2, "batch_size": 16, "warmup_steps": 2},
    "eval": {"num_qualitative": 4},
    "methods": {"transvg": {"model": "transvg"}, "transvg_blind": {"model": "transvg", "language_blind": True}},
}


def tiny_params(**overrides) -> dict:
    """A complete params.yaml content (every key, as DVC needs) for the tiny setup."""
    from refvg.config import Config, _deep_merge

    raw = _deep_merge(Config().model_dump(mode="json"), _deep_merge(TINY, overrides))
    raw["methods"] = overrides.get("methods", TINY["methods"])
    return Config.model_validate(raw).model_dump(mode="json")


def write_params(folder: Path, **overrides) -> Path:
    path = Path(folder) / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(**overrides), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A folder with params.yaml and the generated + prepared tiny dataset. Read-only for tests: copy it
    (or use its paths) rather than writing into it."""
    from refvg import stages
    from refvg.config import load_config

    work = tmp_path_factory.mktemp("tiny")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cfg = load_config(write_params(work))
        stages.generate(cfg)
        stages.prepare(cfg)
    finally:
        os.chdir(cwd)
    return work


@pytest.fixture
def in_tiny(tiny_workdir, tmp_path, monkeypatch) -> Path:
    """cwd = a fresh folder whose data/ links to the session's tiny dataset, with its own params.yaml."""
    (tmp_path / "data").symlink_to(tiny_workdir / "data")
    (tmp_path / "params.yaml").write_text((tiny_workdir / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's own test harness (a real, temporary API server) for the whole session; its URL is also what
    subprocesses (DVC stages) are pointed at, so every test shares one server start."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session", autouse=True)
def stage_worker_dir():
    """Stage processes the tests start (DVC stages, probes) share stage workers (flows/launcher.py) kept in
    a folder of this session, stopped at its end. Short path: it holds unix sockets."""
    import shutil
    import tempfile

    from flows.launcher import DIR_ENV, stop_workers

    folder = Path(tempfile.mkdtemp(prefix="refvg-w-"))
    patch = pytest.MonkeyPatch()
    patch.setenv(DIR_ENV, str(folder))
    try:
        yield folder
    finally:
        stop_workers(folder)
        patch.undo()
        shutil.rmtree(folder, ignore_errors=True)
