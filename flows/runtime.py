"""What every flow process sets up before Prefect runs: telemetry off, and which Prefect API to talk
to.

Prefect's ephemeral server costs ~12 s in every process that starts a flow; DVC runs one process per
stage, so that tax would be paid per stage. Instead, unless `PREFECT_API_URL` names a server, the
first stage starts a local `prefect server` on loopback (state in `.prefect/`, kept running for the
next stages and for the UI) and every later process just connects to it (~2 s). The first stage
starts it before importing its libraries, so the boot (~18 s on a fresh state, mostly database
migrations) overlaps those imports. `REFVG_PREFECT_SERVER=ephemeral` restores the ephemeral
per-process mode.

One server per repository: its state lives in the DVC project's `.prefect/` (`DVC_ROOT`, which DVC
points at the repository for `--temp` and queued experiments too), so experiments running in DVC's
temporary workspaces share the repository's server instead of each starting one that outlives its
workspace; a file lock makes stages that start together (`dvc queue start -j N`) start one server,
not N.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from refvg.tracking import disable_telemetry, from_root

disable_telemetry()  # before prefect / mlflow are imported anywhere in this process

PREFECT_HOME = from_root(os.environ.get("REFVG_PREFECT_HOME", ".prefect")).resolve()
SERVER_LOCK_TIMEOUT_S = 300.0  # another stage booting the server: ~18 s, minutes when thrashing
# A booting server that is alive gets this long to answer (~18 s quiet; its database migrations took
# over 90 s on a 2-core machine under load 10-15); a server that exits fails at once.
SERVER_START_TIMEOUT_S = 300.0
SERVER_STATE = PREFECT_HOME / "server.json"
log = logging.getLogger("refvg.flows")


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recorded_server(home: Path) -> str | None:
    """The API URL of the server recorded in `home`, if it answers."""
    state = home / "server.json"
    if state.exists():
        url = json.loads(state.read_text())["api_url"]
        if _healthy(url):
            return url
    return None


def spawn_local_server(home: Path = PREFECT_HOME) -> tuple[str, subprocess.Popen]:
    """Start `prefect server` detached on loopback without waiting for it; returns (API URL,
    process)."""
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives this stage
            cwd=home,  # not the stage's folder, which may be a temporary workspace DVC deletes
        )
    return url, proc


def wait_for_server(
    url: str,
    proc: subprocess.Popen,
    home: Path = PREFECT_HOME,
    timeout: float = SERVER_START_TIMEOUT_S,
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"prefect server exited with {proc.returncode}; see {home / 'server.log'}"
            )
        if _healthy(url):
            (home / "server.json").write_text(json.dumps({"api_url": url, "pid": proc.pid}))
            print(
                f"refvg: started a Prefect server at {url[:-4]} (UI; state in {home}); "
                f"stop it with: python -m flows.runtime stop",
                file=sys.stderr,
            )
            return url
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(
        f"prefect server did not answer within {timeout:.0f} s; see {home / 'server.log'}"
    )


def begin_local_server(home: Path = PREFECT_HOME) -> Callable[[], str]:
    """The server recorded in `home` if it answers, else a new one started now; the callable waits
    for it and returns its API URL. Until it answers, `home`'s lock is held: a stage starting
    meanwhile waits for this server rather than starting another."""
    from filelock import FileLock

    home.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(home / "server.lock"), timeout=SERVER_LOCK_TIMEOUT_S)
    lock.acquire()
    try:
        url = _recorded_server(home)
        if url:
            lock.release()
            return lambda: url
        spawned = spawn_local_server(home)
    except BaseException:
        lock.release()
        raise

    def ready() -> str:
        try:
            return wait_for_server(*spawned, home)
        finally:
            lock.release()

    return ready


def start_local_server(home: Path = PREFECT_HOME) -> str:
    return begin_local_server(home)()


def stop_local_server(home: Path = PREFECT_HOME) -> bool:
    state = home / "server.json"
    if not state.exists():
        return False
    pid = json.loads(state.read_text())["pid"]
    try:
        os.killpg(pid, 15)
    except ProcessLookupError:
        pass
    state.unlink()
    return True


def begin_prefect_api() -> Callable[[], str | None]:
    """Choose the API this process's flows report to and, if the local server must be started, start
    it now; the returned callable waits for it and gives its URL (None: Prefect's ephemeral server).
    A stage calls this before importing its libraries, so a cold server boots while they import."""
    if os.environ.get("PREFECT_API_URL"):
        url = os.environ["PREFECT_API_URL"]
        return lambda: url
    if os.environ.get("REFVG_PREFECT_SERVER", "local") == "ephemeral":
        return lambda: None
    return begin_local_server(PREFECT_HOME)


def run(flow_fn, url: str | None, **kwargs):
    """Run a flow against the API at `url` (None: the ephemeral server)."""
    if url is None:
        return flow_fn(**kwargs)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        return flow_fn(**kwargs)


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def timed_main(flow_ref, **kwargs) -> None:
    """Entry point of a stage process: runs a flow (`flow_ref`: the flow, or "module:name" to import
    it once the server is booting) and records how the process spent its time
    (`.refvg/timings.jsonl`, read by benchmarks/pipeline.py)."""
    # Prefect configures the root logger its own way; give refvg's loggers (per-epoch lines, skips)
    # a handler.
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    lib = logging.getLogger("refvg")
    lib.setLevel(logging.INFO)
    lib.addHandler(handler)
    lib.propagate = False
    t0 = time.perf_counter()
    api_url = begin_prefect_api()
    if isinstance(flow_ref, str):
        module, name = flow_ref.split(":")
        flow_fn = getattr(
            importlib.import_module(module), name
        )  # prefect, mlflow, torch: seconds of imports
    else:
        flow_fn = flow_ref
    result = run(flow_fn, api_url(), **kwargs)
    record = {
        "flow": flow_fn.name,
        "args": kwargs,
        "flow_seconds": time.perf_counter() - t0,
        "process_seconds": time.time() - _process_start(),
        "work_seconds": (result or {}).get("work_seconds"),
        "via_worker": _via_worker(),
    }
    path = Path(".refvg/timings.jsonl")
    path.parent.mkdir(exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _via_worker() -> bool:
    from flows import launcher

    return launcher.CLIENT_STARTED_AT is not None


def _process_start() -> float:
    from flows import launcher

    if _via_worker():  # in a stage worker's child: the process DVC started is its client
        return launcher.CLIENT_STARTED_AT
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing: fall back to "now", which under-reports
        return time.time()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Manage the local Prefect server the stages share."
    )
    parser.add_argument("action", choices=["start", "stop", "url"])
    action = parser.parse_args().action
    if action == "stop":
        print("stopped" if stop_local_server() else "no local server recorded")
    else:
        print(start_local_server())
