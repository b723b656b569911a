"""A queued DVC experiment, as a user runs it: `dvc exp run --queue -S ...` then `dvc exp run
--run-all`. DVC runs it in a temporary workspace (.dvc/tmp/exps/<tmp>/) that it deletes afterwards.
Its MLflow runs must be in the repository's store, named and tagged after the experiment; the
repository's one Prefect server serves it; and nothing it started is left running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from flows.launcher import DIR_ENV, stop_workers
from tests.helpers import project_copy

pytestmark = pytest.mark.e2e


def sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out}"
    return proc


def _ours(root: Path) -> list[psutil.Process]:
    """Prefect servers and stage workers whose working directory is under `root`."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("prefect" in cmd and "server" in cmd) or "flows.worker" in cmd:
            if (p.info["cwd"] or "").startswith(str(root)):
                found.append(p)
    return found


def _group(p: psutil.Process) -> int:
    try:
        return os.getpgid(p.pid)
    except ProcessLookupError:
        return -1


def test_queued_experiment_logs_to_the_repository_and_leaves_nothing_running(tmp_path):
    repo = project_copy(
        tmp_path / "repo",
        synthetic={"num_images": 32, "image_size": 64, "seed": 0},
        train={"epochs": 1},
        methods={"transvg": {"model": "transvg"}},
    )
    defaults = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "REFVG_PREFECT_HOME")  # a user's
    env = {k: v for k, v in os.environ.items() if k not in defaults}
    workers = Path(tempfile.mkdtemp(prefix="refvg-x-"))  # its own stage workers (a short path)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            DIR_ENV: str(workers),
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
            "REFVG_CPU_SLOTS_DIR": str(tmp_path / "cpu-slots"),
        }
    )
    (repo / ".gitignore").write_text("mlruns.db*\nmlartifacts/\n.prefect/\n.refvg/\n")
    sh(["git", "init", "-q"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)
    sh(["dvc", "config", "core.analytics", "false"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "init"], repo, env)
    before = {p.pid for p in _ours(tmp_path)}
    try:
        sh(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.002", "-n", "lr-up"], repo, env)
        sh(["dvc", "exp", "run", "--run-all"], repo, env)  # returns once the queue ran
        shown = sh(["dvc", "exp", "show", "--json"], repo, env).stdout
        assert "lr-up" in shown

        # Its runs are in the repository's store (not in the deleted workspace), named after it.
        assert not list((repo / ".dvc" / "tmp").glob("exps/tmp*"))
        client = MlflowClient(f"sqlite:///{repo / 'mlruns.db'}")
        runs = client.search_runs([client.get_experiment_by_name("refvg").experiment_id])
        [parent] = [r for r in runs if r.data.tags.get("refvg.kind") == "pipeline"]
        assert parent.data.tags["dvc.exp_name"] == "lr-up"
        assert parent.info.run_name.startswith("lr-up (")
        assert parent.data.params["train.lr"] == "0.002" and parent.info.status == "FINISHED"
        stages = {
            r.data.tags["refvg.stage"]: r for r in runs if r.data.tags.get("refvg.kind") == "stage"
        }
        assert {"train@transvg", "evaluate@transvg", "report"} <= set(stages)
        assert all(
            r.data.tags["dvc.exp_name"] == "lr-up" and r.info.status == "FINISHED"
            for r in stages.values()
        )
        assert stages["train@transvg"].data.params["train.lr"] == "0.002"
        version = client.get_model_version("refvg-transvg", "1")
        assert version.run_id == stages["train@transvg"].info.run_id
        artifacts = {a.path for a in client.list_artifacts(stages["evaluate@transvg"].info.run_id)}
        assert "transvg.json" in artifacts  # artifacts too: the repository's mlartifacts/

        # One Prefect server, the repository's; no stage worker of the deleted workspace lives on.
        server = json.loads((repo / ".prefect" / "server.json").read_text())["pid"]
        others = [p for p in _ours(tmp_path) if _group(p) != server and p.pid not in before]
        _, alive = psutil.wait_procs(others, timeout=60)  # a worker sees its project gone in ~1 s
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        logs = [log.read_text() for log in workers.glob("worker-*.log")]
        assert logs and all("listening on" in t and t.rstrip().endswith("exiting") for t in logs)
        left = _ours(tmp_path)
        assert server in {p.pid for p in left} and {_group(p) for p in left} == {server}
    finally:
        from flows.runtime import stop_local_server

        stop_local_server(repo / ".prefect")
        stop_workers(workers)
        shutil.rmtree(workers, ignore_errors=True)
        for p in _ours(tmp_path):
            if p.pid not in before:
                p.kill()
