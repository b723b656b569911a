"""Claims of the README that had no test (issue 19): telemetry off in a stage process, `python -m
refvg.tracking replay` from the command line, a hung (accepting, never answering) MLflow server
costing its timeout rather than the stage, the project's local Prefect server (start, reuse, stop),
and the stage worker exiting when idle and its client killing the stage when the worker dies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from refvg.config import load_config
from refvg.tracking import TELEMETRY_OFF, stage_run
from tests.helpers import ROOT, pid_alive, write_params
from tests.faults import blocked_sqlite_store, log_process


def _env(**extra) -> dict:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, **extra}


TELEMETRY_PROBE = """
import json, os, sys
import flows.stages  # what every stage module imports first
from dvc.analytics import is_enabled
from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY
from prefect.settings import get_current_settings

print(json.dumps({"mlflow_disabled": MLFLOW_DISABLE_TELEMETRY.get(), "dvc_enabled": is_enabled(),
                  "prefect_analytics": get_current_settings().server.analytics_enabled,
                  "do_not_track": os.environ.get("DO_NOT_TRACK")}))
"""


def test_telemetry_is_off_in_a_stage_process(tmp_path):
    env = {k: v for k, v in _env().items() if k not in TELEMETRY_OFF and k != "DVC_TEST"}
    # cwd without a .dvc/config: only what the flows set can turn DVC's analytics off
    proc = subprocess.run(
        [sys.executable, "-c", TELEMETRY_PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {
        "mlflow_disabled": True,
        "dvc_enabled": False,
        "prefect_analytics": False,
        "do_not_track": "true",
    }, seen
    config = (ROOT / ".dvc" / "config").read_text()
    assert "analytics = false" in config  # and the project's DVC config, for `dvc` run by hand


def test_replay_from_the_command_line(tmp_path, monkeypatch):
    """A stage that ended while its store was down left a file; the documented command sends it."""
    blocker, uri = blocked_sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    unlogged = tmp_path / "unlogged"
    cfg = load_config(write_params(tmp_path, tracking={"unlogged_dir": str(unlogged)}))
    with stage_run(cfg, "train@m1", params={"stage": "train@m1"}) as tracker:
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
    [saved] = unlogged.glob("*.json")
    blocker.unlink()  # the store is back
    proc = subprocess.run(
        [sys.executable, "-m", "refvg.tracking", "replay", str(saved)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "replayed 1 of 1 file(s)" in proc.stdout, (
        proc.stdout + proc.stderr[-3000:]
    )
    client = MlflowClient(uri)
    [run] = [
        r
        for r in client.search_runs([client.get_experiment_by_name("refvg").experiment_id])
        if r.data.tags.get("refvg.stage") == "train@m1"
    ]
    assert sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")
    ) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert run.data.params["stage"] == "train@m1"


def test_a_hung_tracking_server_costs_its_timeout_not_the_stage(tmp_path):
    """A server that accepts connections and never answers (not one that refuses them): each call
    gives up after `tracking.http_timeout_s`, the stage finishes and keeps its calls. Without the
    bound, MLflow's defaults (120 s, 7 retries with backoff) would hold the stage far past the
    ceiling below."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
    uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
    unlogged = tmp_path / "unlogged"
    write_params(
        tmp_path, tracking={"http_retries": 0, "http_timeout_s": 2, "unlogged_dir": str(unlogged)}
    )
    # As a fresh shell has it: an earlier test's in-process tracking exported MLflow's HTTP settings
    # here, which a child process would take for the user's own (they win over params).
    from refvg.tracking import _HTTP_ENV

    env = {k: v for k, v in _env(MLFLOW_TRACKING_URI=uri).items() if k not in _HTTP_ENV}
    proc = log_process(tmp_path, "train@m1", 3, env)
    try:
        out, err = proc.communicate(
            timeout=300
        )  # a ceiling two orders of magnitude above the bound
    finally:
        proc.kill()
        proc.wait()
        hung.close()
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["failures"] >= 1 and result["run_id"] is None, result
    [saved] = unlogged.glob("*.json")
    calls = json.loads(saved.read_text())["pending"]
    assert (
        sum(len(c["metrics"]) for c in calls if c["kind"] == "metrics") == 2 * 3
    )  # loss and acc, 3 steps


def _stop_server(home: Path) -> None:
    state = home / "server.json"
    if state.exists():
        pid = json.loads(state.read_text())["pid"]
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def _gone(pid: int, ceiling: float = 300) -> bool:
    """Waits for a process that is not our child to end (a ceiling, not a race)."""
    deadline = time.monotonic() + ceiling
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.e2e
def test_the_local_prefect_server_starts_once_is_reused_and_stops(tmp_path):
    home = tmp_path / "prefect"
    env = {k: v for k, v in _env(REFVG_PREFECT_HOME=str(home)).items() if k != "PREFECT_API_URL"}

    def runtime(action: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.runtime", action],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()[-1]

    try:
        url = runtime("url")
        state = json.loads((home / "server.json").read_text())
        assert state["api_url"] == url and _healthy(url) and pid_alive(state["pid"])
        assert runtime("url") == url  # reused: the same server, not a second one
        assert json.loads((home / "server.json").read_text())["pid"] == state["pid"]
        assert runtime("stop") == "stopped"
        assert _gone(state["pid"]) and not _healthy(url)
        assert runtime("stop") == "no local server recorded"
    finally:
        _stop_server(home)


SLEEPER = """
import os, sys, time

from flows.launcher import launch


def main(argv):
    if argv:
        open(argv[0], "w").write(str(os.getpid()))
        time.sleep(600)
    print(os.getppid())  # the worker that forked this stage


if __name__ == "__main__":
    launch("sleeper_stage", main)
"""


@pytest.mark.e2e
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the stage worker needs fork and unix sockets")
def test_the_stage_worker_dies_its_stage_dies_and_an_idle_worker_exits(tmp_path):
    import shutil
    import tempfile

    from flows.launcher import DIR_ENV, IDLE_ENV, list_workers

    project = tmp_path / "project"
    project.mkdir()
    # A short path: the worker's unix socket goes in it, and under tmp_path (deeper on an xdist
    # worker: .../popen-gw0/...) the socket's path passed the launcher's 100-byte limit, so the
    # stage ran in-process with no worker to kill.
    workers = Path(tempfile.mkdtemp(prefix="refvg-w-"))
    (project / "sleeper_stage.py").write_text(SLEEPER)
    env = _env(
        REFVG_PREFECT_SERVER="ephemeral",
        PREFECT_LOGGING_LEVEL="WARNING",
        **{DIR_ENV: str(workers), IDLE_ENV: "2"},
    )
    pid_file, log = tmp_path / "child.pid", tmp_path / "client.log"
    # The client's output to a file: a stage left running would hold a pipe open, and reading it
    # would hang.
    with open(log, "w") as out:
        client = subprocess.Popen(
            [sys.executable, "-m", "sleeper_stage", str(pid_file)],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    child = None
    try:
        while not pid_file.exists() or not pid_file.read_text():
            assert client.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        child = int(pid_file.read_text())
        [worker] = list_workers(workers)
        os.kill(
            worker["pid"], signal.SIGKILL
        )  # the worker dies; its client must not leave the stage running
        client.wait(timeout=300)
        err = log.read_text()
        assert client.returncode == 1 and "the stage worker died while running the stage" in err, (
            err[-3000:]
        )
        assert _gone(child), f"stage {child} outlived its worker"

        # A fresh worker serves the next stage, then exits by itself after REFVG_STAGE_WORKER_IDLE
        # seconds.
        done = subprocess.run(
            [sys.executable, "-m", "sleeper_stage"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0 and "unavailable" not in done.stderr, done.stderr[-3000:]
        worker = int(done.stdout.split()[-1])
        assert worker != os.getpid() and _gone(worker), "the idle worker did not exit"
        assert not list(workers.glob("worker-*.sock")), "its socket is removed"
    finally:
        if child is not None and pid_alive(child):
            os.kill(child, signal.SIGKILL)
        client.kill()
        client.wait()
        for w in list_workers(workers) if workers.exists() else []:
            os.kill(w["pid"], signal.SIGKILL)
        shutil.rmtree(workers, ignore_errors=True)


def test_storage_setup_creates_the_bucket_when_asked(tmp_path, s3_bucket):
    from refvg import storage
    from refvg.config import Config

    settings = {**s3_bucket["settings"], "bucket": f"{s3_bucket['settings']['bucket'][:50]}-made"}
    loc = storage.location(Config.model_validate({"storage": settings}))
    s3 = storage.client(loc)
    assert settings["bucket"] not in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
    ):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    write_params(repo, storage=settings)
    proc = subprocess.run(
        [sys.executable, "-m", "refvg.cli", "storage", "setup", "--create-bucket"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert settings["bucket"] in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert loc.dvc_url in (repo / ".dvc" / "config").read_text()
