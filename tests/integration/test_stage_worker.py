"""The stage worker (flows/launcher.py, flows/worker.py): a stage run through it behaves as one run
in its own process, a worker started under other settings is not reused, a dead client takes its
stage with it, and REFVG_STAGE_WORKER=0 runs stages in-process. Real processes throughout: the
client is `python -m <stage>`, the worker is forked from the real one the client starts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.launcher import DIR_ENV, SWITCH_ENV, list_workers, worker_key
from tests.helpers import ROOT, pid_alive, write_params

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="the stage worker needs fork and unix sockets"
)

PROBE = """
import json, os, sys, tempfile, time

from flows.launcher import launch


def main(argv):
    import numpy as np
    import torch

    if argv[:1] == ["sleep"]:
        import signal
        # what a stage does on SIGTERM: clean exit
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
        open(argv[1], "w").write(str(os.getpid()))
        try:
            time.sleep(120)
        finally:
            print("cleanup ran", file=sys.stderr, flush=True)
    torch.ones(256, 256) @ torch.ones(256, 256)  # a parallel region: the child's own OpenMP pool
    print(json.dumps({
        "argv": argv, "sys.argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(),
        "ppid": os.getppid(), "probe_env": os.environ.get("PROBE_VALUE"), "stdin": sys.stdin.read(),
        "umask": os.umask(0o022), "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "sys_path": sys.path,
        "tempdir": tempfile.gettempdir(), "numpy_draw": float(np.random.rand()),
        "stdout_tty": sys.stdout.isatty(),
    }))
    if argv[:1] == ["exit"]:
        sys.exit(int(argv[1]))
    if argv[:1] == ["raise"]:
        raise RuntimeError("probe failed on purpose")


if __name__ == "__main__":
    launch("probe_stage", main)
"""


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
    """One project folder for the probes, so they share a worker (a worker serves one project)."""
    folder = tmp_path_factory.mktemp("probe")
    (folder / "probe_stage.py").write_text(PROBE)
    return folder


def stage_env(**extra) -> dict:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    # ephemeral: a cold client would start a local Prefect server for the stage (the probes run no
    # flow)
    return {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "REFVG_PREFECT_SERVER": "ephemeral",
        **extra,
    }


def run_probe(
    folder: Path, *args: str, env: dict | None = None, stdin: str = ""
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "probe_stage", *args],
        cwd=folder,
        env=env or stage_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        umask=0o027,
    )


def facts(proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.strip(), f"no output; stderr:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_stage_in_the_worker_sees_what_it_would_see_in_its_own_process(probe_dir):
    env = stage_env(PROBE_VALUE="42")
    served = run_probe(probe_dir, "a", "--b", env=env, stdin="from stdin\n")
    alone = run_probe(probe_dir, "a", "--b", env={**env, SWITCH_ENV: "0"}, stdin="from stdin\n")
    assert served.returncode == alone.returncode == 0, served.stderr + alone.stderr
    w, a = facts(served), facts(alone)
    assert w["ppid"] != os.getpid() and a["ppid"] == os.getpid(), (
        "in-process: the probe is pytest's child"
    )
    differs = {k for k in w if w[k] != a[k]}
    assert differs == {"pid", "ppid", "numpy_draw"}, {k: (w[k], a[k]) for k in differs}
    assert w["stdin"] == "from stdin\n" and w["umask"] == 0o027 and w["probe_env"] == "42"
    # each child draws fresh numbers, as a fresh process would, not the worker's generator state
    assert facts(run_probe(probe_dir, env=env))["numpy_draw"] != w["numpy_draw"]


def test_exit_status_and_errors_pass_through(probe_dir):
    assert run_probe(probe_dir, "exit", "3").returncode == 3
    failed = run_probe(probe_dir, "raise")
    assert failed.returncode == 1
    assert "RuntimeError: probe failed on purpose" in failed.stderr
    assert "flows/worker.py" not in failed.stderr, (
        "the traceback starts at the stage, as in its own process"
    )


def test_a_worker_started_under_other_settings_is_not_reused(probe_dir, stage_worker_dir):
    first = facts(run_probe(probe_dir))["ppid"]  # the probe's parent is the worker that forked it
    assert facts(run_probe(probe_dir, env=stage_env(UNRELATED_VARIABLE="1")))["ppid"] == first
    # Prefect reads its settings when imported: a worker imported under another value must not serve
    other = facts(run_probe(probe_dir, env=stage_env(PREFECT_LOGGING_LEVEL="ERROR")))["ppid"]
    assert other != first
    assert {first, other} <= {w["pid"] for w in list_workers(stage_worker_dir)}


def test_worker_key_follows_what_imports_read():
    base = {"HOME": "/home/x", "PATH": "/bin"}
    key = worker_key(base)
    assert worker_key({**base, "PATH": "/usr/bin", "MLFLOW_TRACKING_URI": "sqlite:///b.db"}) == key
    for changed in (
        {"PREFECT_API_URL": "http://h/api"},
        {"OMP_NUM_THREADS": "1"},
        {"PYTHONHASHSEED": "0"},
        {"HF_HOME": "/tmp/hf"},
        {"HOME": "/home/y"},
    ):
        assert worker_key({**base, **changed}) != key, changed
    assert worker_key(base, interpreter_flags=["-O"]) != key


def _as_from_a_terminal() -> None:
    # SIGINT and SIGQUIT as a shell with job control leaves them to the command it starts. Under a
    # non-interactive `pytest ... &` they arrive ignored, and an ignored SIGINT is (rightly) not
    # forwarded: the client, as Python itself would, stays deaf to it (this test then timed out,
    # issue 18).
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_the_stage_dies_with_its_client(probe_dir, how, tmp_path):
    pid_file = tmp_path / "child.pid"
    client = subprocess.Popen(
        [sys.executable, "-m", "probe_stage", "sleep", str(pid_file)],
        cwd=probe_dir,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_from_a_terminal,
    )
    child = None
    try:
        deadline = time.monotonic() + 300
        while not pid_file.exists() or not pid_file.read_text():
            assert client.poll() is None and time.monotonic() < deadline, "the stage did not start"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert child != client.pid, "the stage ran in the worker"
        client.send_signal(getattr(signal, how))
        _, err = client.communicate(
            timeout=300
        )  # the client ends with its stage: waits on its exit
        if (
            how == "SIGINT"
        ):  # forwarded: the stage gets its KeyboardInterrupt, cleans up, and dies of SIGINT
            assert (
                client.returncode == -signal.SIGINT
                and "KeyboardInterrupt" in err
                and "cleanup ran" in err
            ), err
        if (
            how == "SIGTERM"
        ):  # forwarded: the stage's own handler exits 3, and the client with it (not -15)
            assert client.returncode == 3 and "cleanup ran" in err, (client.returncode, err)
        deadline = (
            time.monotonic() + 300
        )  # a ceiling, not a race: the worker kills it within seconds
        while pid_alive(child):
            assert time.monotonic() < deadline, f"stage {child} outlived its client ({how})"
            time.sleep(0.2)
    finally:
        if child is not None and pid_alive(
            child
        ):  # first: it holds the client's stdout/stderr open
            os.kill(child, signal.SIGKILL)
        client.kill()
        client.communicate()


class _Interrupted(Exception):
    pass


def test_a_signal_before_the_stage_is_known_reaches_the_stage():
    """SIGINT between the request and the worker's reply (the child may already run): held, then
    forwarded to the child, not taken by the client alone. A fake worker on a socketpair, the client
    in this process."""
    from flows import launcher

    saved = {sig: signal.getsignal(sig) for sig in launcher.FORWARDED_SIGNALS}
    client, worker = socket.socketpair()
    main_thread = threading.main_thread().ident
    forwarded: list[dict] = []

    def fake_worker():
        _, fds, _, _ = socket.recv_fds(worker, 1, 3)
        for fd in fds:
            os.close(fd)
        lines = worker.makefile("rb")
        assert json.loads(lines.readline())["op"] == "run"
        signal.pthread_kill(main_thread, signal.SIGINT)  # the client is blocked reading the reply
        time.sleep(0.2)  # (only to let the signal land before the reply; either order must pass)
        launcher.send_message(worker, {"pid": 4242})
        forwarded.append(json.loads(lines.readline() or b"{}"))

    def interrupted(*_):
        # what the client would do without forwarding: end, leaving the stage behind
        raise _Interrupted

    thread = threading.Thread(target=fake_worker)
    try:
        signal.signal(signal.SIGINT, interrupted)
        thread.start()
        remote = launcher._start_remote(client, "probe_stage", dict(os.environ))
        thread.join(timeout=60)
        assert isinstance(remote, launcher._Remote) and remote.child == 4242
        assert forwarded == [{"signal": signal.SIGINT}]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        worker.shutdown(socket.SHUT_RDWR)  # ends the fake worker's read, whatever the client did
        client.close()
        worker.close()
        thread.join(timeout=60)


def test_kill_switch_runs_the_stage_in_process(probe_dir, tmp_path):
    folder = tmp_path / "workers"
    proc = run_probe(probe_dir, env=stage_env(**{SWITCH_ENV: "0", DIR_ENV: str(folder)}))
    assert proc.returncode == 0 and facts(proc)["ppid"] == os.getpid()
    assert not folder.exists() or not list(folder.iterdir()), "no worker started"


def test_real_stage_gives_the_same_outputs_through_the_worker(tmp_path, prefect_api):
    """`generate` (Prefect flow + MLflow run) once through the worker, once in-process: same files,
    same logged params and metrics."""
    results = {}
    for mode in ("worker", "in-process"):
        work = tmp_path / mode
        work.mkdir()
        write_params(work, synthetic={"num_images": 16, "image_size": 64, "seed": 3})
        uri = f"sqlite:///{work / 'mlruns.db'}"
        env = stage_env(
            PREFECT_API_URL=prefect_api,
            MLFLOW_TRACKING_URI=uri,
            **{SWITCH_ENV: "0" if mode == "in-process" else "1"},
        )
        proc = subprocess.run(
            [sys.executable, "-m", "flows.generate"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        files = {
            str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((work / "data").rglob("*"))
            if p.is_file()
        }
        client = MlflowClient(uri)
        (run,) = [
            r
            for r in client.search_runs([client.get_experiment_by_name("refvg").experiment_id])
            if r.data.tags.get("refvg.stage") == "generate"
        ]
        metrics = {k: v for k, v in run.data.metrics.items() if not k.endswith("_seconds")}
        timing = json.loads((work / ".refvg/timings.jsonl").read_text().splitlines()[-1])
        assert timing["via_worker"] == (mode == "worker")
        results[mode] = (files, run.data.params, metrics, run.info.status, timing["flow"])
    assert results["worker"][0], "generate wrote no files"
    assert results["worker"] == results["in-process"]
