"""End to end, as a user runs it: `dvc repro` in a real git repo on the tiny dataset, every stage a
Prefect flow process reporting to a real Prefect API and a real MLflow sqlite store; then a no-op
repro and an experiment with a changed param."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import project_copy

pytestmark = pytest.mark.e2e


def sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


@pytest.fixture
def dvc_repo(tmp_path, prefect_api) -> tuple[Path, dict]:
    repo = project_copy(
        tmp_path / "repo", synthetic={"num_images": 32, "image_size": 64, "seed": 0}
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_API_URL": prefect_api,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    sh(["git", "init", "-q"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)
    sh(["dvc", "config", "core.analytics", "false"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def test_dvc_repro_noop_and_experiment(dvc_repo, tmp_path):
    repo, env = dvc_repo
    out = sh(["dvc", "repro"], repo, env)
    timings = [
        json.loads(line) for line in (repo / ".refvg/timings.jsonl").read_text().splitlines()
    ]
    assert len(timings) == 10 and all(t["via_worker"] for t in timings), (
        "every stage ran in a stage worker's child"
    )
    for stage in (
        "generate",
        "pretrain",
        "prepare",
        "detections",
        "teacher",
        "train@transvg",
        "evaluate@transvg",
        "train@transvg_blind",
        "report",
    ):
        assert f"'{stage}'" in out.stdout, f"stage {stage} did not run:\n{out.stdout}"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"generate", "prepare", "train@transvg", "evaluate@transvg_blind", "report"} <= set(
        lock["stages"]
    )
    metrics = json.loads((repo / "metrics/transvg.json").read_text())
    assert {"val", "testA", "testB"} <= set(metrics["splits"])
    summary = (repo / "reports/summary.md").read_text()
    assert (
        "\n| transvg | transvg | yes |" in summary
        and "\n| transvg_blind | transvg | blind" in summary
    )

    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    assert "metrics/transvg.json" in json.dumps(shown)

    noop = sh(
        ["dvc", "repro"], repo, env
    )  # (how long it takes: benchmarks/overhead.py, not a clock here)
    assert "didn't change, skipping" in noop.stdout and "Running stage" not in noop.stdout

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("refvg").experiment_id])
    parents = [r for r in runs if r.data.tags.get("refvg.kind") == "pipeline"]
    assert len(parents) == 1  # one process per stage, still one parent run
    assert sum(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in runs) == 10

    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "pipeline ran"], repo, env)
    baseline_lr = yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"]
    new_lr = (
        baseline_lr * 2
    )  # a value that differs from the committed one, so the training stages rerun
    exp = sh(["dvc", "exp", "run", "-S", f"train.lr={new_lr}", "-n", "lr-up"], repo, env)
    ran = {
        "resolve",
        "train@transvg",
        "train@transvg_blind",
        "evaluate@transvg",
        "evaluate@transvg_blind",
        "report",
    }  # resolve: params changed; its stamps of both methods changed, so both retrain
    for stage in ran:
        assert f"Running stage '{stage}'" in exp.stdout, f"{stage} did not rerun:\n{exp.stdout}"
    for stage in ("generate", "pretrain", "prepare", "detections", "teacher"):  # not on train.*
        assert f"Stage '{stage}' didn't change, skipping" in exp.stdout, (
            f"{stage} reran:\n{exp.stdout}"
        )
    assert exp.stdout.count("Running stage") == len(ran), exp.stdout
    states = list(_exp_states(json.loads(sh(["dvc", "exp", "show", "--json"], repo, env).stdout)))
    head = sh(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    [base] = [s["data"] for s in states if s["rev"] == head]
    [up] = [s["data"] for s in states if s.get("name") == "lr-up"]
    assert base["params"]["params.yaml"]["data"]["train"]["lr"] == baseline_lr
    assert up["params"]["params.yaml"]["data"]["train"]["lr"] == new_lr
    old_val = base["metrics"]["metrics/transvg.json"]["data"]["splits"]["val"]
    new_val = up["metrics"]["metrics/transvg.json"]["data"]["splits"]["val"]
    assert new_val["mean_iou"] != old_val["mean_iou"], "the experiment shows the baseline's metrics"
    assert new_val == json.loads((repo / "metrics/transvg.json").read_text())["splits"]["val"]

    # A value DVC takes and refvg must refuse: refvg's own check, naming the key, stops the first
    # stage that reads the config, before anything trains.
    bad = subprocess.run(
        ["dvc", "exp", "run", "-S", "train.epochs=many"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0, out[-4000:]
    assert (
        "train.epochs: Input should be a valid integer" in out and "invalid configuration" in out
    ), out[-4000:]
    assert "Running stage 'evaluate" not in out


def _exp_states(shown: list[dict]):
    """Every state `dvc exp show --json` lists: the workspace, the baseline commit and its
    experiments."""
    for state in shown:
        yield state
        for exp_range in state.get("experiments") or []:
            yield from exp_range["revs"]
