"""The scheduled deployment's flow is `dvc repro` (then `dvc push`): in a real git + DVC repository,
a first scheduled run runs the stale stages and pushes to the remote; a second with nothing changed
trains nothing and leaves dvc.lock as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import project_copy

pytestmark = pytest.mark.e2e


def _git_dvc_repo(repo: Path, env: dict) -> None:
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr}"


def test_scheduled_run_is_dvc_repro_and_a_second_one_trains_nothing(
    tmp_path, prefect_api, monkeypatch
):
    from flows.scheduled import scheduled_flow

    repo = project_copy(
        tmp_path / "repo",
        synthetic={"num_images": 24, "image_size": 64, "seed": 0},
        train={"epochs": 1, "batch_size": 16, "warmup_steps": 2},
        methods={"transvg": {"model": "transvg"}},
    )
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    for key, value in {
        "PREFECT_API_URL": prefect_api,
        "MLFLOW_TRACKING_URI": store,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }.items():
        monkeypatch.setenv(key, value)
    import os

    _git_dvc_repo(repo, dict(os.environ))
    remote = tmp_path / "remote"
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)],
        cwd=repo,
        check=True,
    )

    first = scheduled_flow(repo=str(repo))
    assert {"generate", "prepare", "train@transvg", "evaluate@transvg", "report"} <= set(
        first["ran"]
    )
    assert first["pushed"] and any(
        p.is_file() for p in remote.rglob("*")
    )  # the outputs are in the remote
    lock = (repo / "dvc.lock").read_text()

    second = scheduled_flow(repo=str(repo))
    assert second["ran"] == [] and {"train@transvg", "evaluate@transvg"} <= set(second["skipped"])
    assert (repo / "dvc.lock").read_text() == lock

    client = MlflowClient(store)
    runs = client.search_runs(
        [client.get_experiment_by_name("refvg").experiment_id],
        filter_string="tags.`refvg.stage` = 'train@transvg'",
    )
    assert len(runs) == 1  # trained once, by the first night only
