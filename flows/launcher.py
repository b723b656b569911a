"""The entry of every DVC stage process: hand the stage to a warm stage worker, or run it in this
process.

DVC starts each stage as a fresh `python -m flows.<stage>`. Importing prefect, mlflow, torch and
transformers costs such a process seconds before it does any work, and the finished pipeline has ~17
of them. So the stage entry is this thin client (standard library only): it connects to a long-lived
worker (`flows/worker.py`) over a unix socket and passes it argv, cwd, umask, the environment and
its stdin/stdout/stderr (SCM_RIGHTS). The worker, which has those libraries imported but none of
refvg's or flows' code, forks a child that takes on this process's state, imports the stage code
fresh, runs it and reports its exit status, which this process exits with. Signals this process gets
(Ctrl-C, SIGTERM, SIGHUP) are forwarded to the child; if this process dies, the worker kills the
child, and if the worker dies, this process kills the child.

A worker only serves clients whose *key* it was started with: the interpreter and its flags,
sys.path (so, the project: one worker per checkout), the state of site-packages, the environment
variables the pre-imported libraries read at import time (`KEYED_ENV_PREFIXES`), the settings files
Prefect and matplotlib read from the working directory and Prefect's profiles, the CPU affinity, and
this module's and the worker's own source. A client with another key starts another worker; a worker
idle for `REFVG_STAGE_WORKER_IDLE` seconds (default 600) exits by itself. The first stage of a
pipeline starts the worker (it pays the imports once) and, as the in-process path does, the local
Prefect server, which boots meanwhile.

    REFVG_STAGE_WORKER=0              run stages in-process, exactly as without the worker
    REFVG_STAGE_WORKER_DIR=PATH       where sockets and worker logs live (default: per-user dir)
    python -m flows.launcher list     the workers of this user: socket, pid, idle seconds
    python -m flows.launcher stop     stop them (a running stage is terminated)

Platforms without fork, unix sockets or fd passing run the stages in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn

_IMPORTED_AT = (
    time.time()
)  # sent with a request: the client's start, less the interpreter's own (~30 ms)
# In a worker child: when its client, the process DVC started, began (flows.runtime reports stage
# times by it).
CLIENT_STARTED_AT: float | None = None

SWITCH_ENV = "REFVG_STAGE_WORKER"
DIR_ENV = "REFVG_STAGE_WORKER_DIR"
IDLE_ENV = "REFVG_STAGE_WORKER_IDLE"
DEFAULT_IDLE_SECONDS = 600.0
MAX_SOCKET_PATH = 100  # sun_path holds 104 bytes on macOS, 108 on Linux
START_TIMEOUT_SECONDS = (
    180.0  # a worker's imports take ~10 s on a quiet 2-core machine, far longer on a busy one
)
# Read at import time by prefect, mlflow, torch, transformers, numpy, matplotlib or Python itself: a
# worker whose libraries were imported under other values would run the stage with the wrong
# settings.
KEYED_ENV_PREFIXES = (
    "PREFECT_",
    "MLFLOW_",
    "PYTHON",
    "PYTORCH_",
    "TORCH",
    "CUDA_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "KMP_",
    "GOMP_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "SQLALCHEMY_",
    "MPL",
    "ARROW_",
    "GIT_PYTHON",
    "LC_",
    "LANG",
    "TZ",
    "DO_NOT_TRACK",
    "TMPDIR",
    "HOME",
    "NO_COLOR",
    "TERM",
    "COLUMNS",
)
# (no SIGHUP or SIGQUIT on Windows, where this module must still import, to run stages in-process)
FORWARDED_SIGNALS = tuple(
    getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n)
)
UNKEYED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
)  # MLflow reads these per call, not at import
# Read from the working directory at import time: Prefect's settings, matplotlib's rc file.
CWD_SETTINGS_FILES = (".env", "prefect.toml", "pyproject.toml", "matplotlibrc")
_SOURCES = (
    "launcher.py",
    "worker.py",
)  # the worker's own code: a changed copy must not be served by an old one


def enabled(env: dict[str, str] = os.environ) -> bool:
    """Whether stages go through a worker: not switched off, and the platform has what it needs."""
    if env.get(SWITCH_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if (
        "WORLD_SIZE" in env
    ):  # a torchrun rank: it must stay the launcher's child to join its process group
        return False
    return hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")


def runtime_dir(env: dict[str, str] = os.environ) -> Path:
    """A folder only this user can use (the socket hands over the environment and file
    descriptors)."""
    if env.get(DIR_ENV):
        base = Path(env[DIR_ENV])
    elif env.get("XDG_RUNTIME_DIR"):
        base = Path(env["XDG_RUNTIME_DIR"]) / "refvg"
    else:
        import tempfile

        base = Path(tempfile.gettempdir()) / f"refvg-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{base} must belong to this user and be closed to others (mode 700)")
    return base


def worker_key(env: dict[str, str], interpreter_flags: list[str] | None = None) -> str:
    """What a worker's pre-imported libraries depend on (see the module docstring), hashed."""
    import site
    import subprocess

    flags = (
        subprocess._args_from_interpreter_flags()
        if interpreter_flags is None
        else interpreter_flags
    )
    sites = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    prefect_home = Path(
        env.get("PREFECT_HOME", Path(env.get("HOME", "~")) / ".prefect")
    ).expanduser()
    profiles = Path(env.get("PREFECT_PROFILES_PATH", prefect_home / "profiles.toml"))
    here = Path(__file__).resolve().parent
    parts = {
        "python": [sys.executable, sys.version, flags],
        # [0] is the project: importing from there, or caching what is installed there (its
        # egg-info), a worker started for another checkout could differ. So each project gets its
        # own worker.
        "sys.path": sys.path,
        "site": {p: os.stat(p).st_mtime_ns for p in sites},
        "env": sorted(
            (k, v)
            for k, v in env.items()
            if k.startswith(KEYED_ENV_PREFIXES) and k not in UNKEYED_ENV
        ),
        "settings": [_digest(p) for p in (profiles, *(Path(name) for name in CWD_SETTINGS_FILES))],
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "source": [_digest(here / name) for name in _SOURCES],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def socket_path(folder: Path, key: str) -> Path:
    return folder / f"worker-{key}.sock"


# --- the wire: a request is one byte (carrying the client's stdin/stdout/stderr when it runs a
# stage) and a JSON line; replies and forwarded signals are JSON lines.


def send_message(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def send_request(sock: socket.socket, request: dict, fds: list[int] | None = None) -> None:
    if fds:
        socket.send_fds(sock, [b"R"], fds)
    else:
        sock.sendall(b"R")
    send_message(sock, request)


def launch(module: str, main: Callable[[list[str]], None]) -> NoReturn:
    """Run the stage `module` (whose `main(argv)` runs it in-process) and exit with its status."""
    env = dict(
        os.environ
    )  # before anything here sets telemetry defaults: the key is about what the user set
    argv = sys.argv[1:]
    if enabled(env):
        why = None
        for _ in range(2):  # a worker that idled out just as we connected: start another
            try:
                started = _start_remote(_connect(env), module, env)
            except _Unavailable as err:
                why = err
                break
            if isinstance(started, _Remote):
                sys.exit(started.wait())
            why = started
        print(
            f"refvg: stage worker unavailable ({why}); running the stage in this process",
            file=sys.stderr,
        )
    main(argv)
    sys.exit(0)


class _Unavailable(Exception):
    """No worker could be reached or started; the stage runs in-process instead."""


def _connect(env: dict[str, str]) -> socket.socket:
    try:
        folder = runtime_dir(env)
        path = socket_path(folder, worker_key(env))
    except OSError as err:
        raise _Unavailable(err) from None
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise _Unavailable(
            f"socket path {path} is too long for a unix socket; set {DIR_ENV} to a shorter folder"
        )
    sock = _try_connect(path)
    if sock is not None:
        return sock
    import fcntl

    # One spawner per key: stages started side by side (dvc exp run --jobs) must not start two
    # workers.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _try_connect(path)
        if sock is None:
            _start_worker(path, env)
            sock = _try_connect(path)
        if sock is None:
            raise _Unavailable(
                f"the worker started for {path} does not answer; see {path.with_suffix('.log')}"
            )
    return sock


def _try_connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:  # no such socket, or one left by a worker that died: a new worker replaces it
        sock.close()
        return None


def _start_worker(path: Path, env: dict[str, str]) -> None:
    """Start a worker for `path`'s key and wait until it listens (its imports done). A cold local
    Prefect server boots meanwhile, as the in-process path does
    (flows.runtime.begin_prefect_api)."""
    import subprocess

    from flows.runtime import begin_prefect_api

    prefect_ready = begin_prefect_api()
    # A socket file that refused us (we hold the spawn lock) is a dead worker's: gone, so that the
    # wait below is for the new worker's socket, not satisfied at once by the old one.
    path.unlink(missing_ok=True)
    log = path.with_suffix(".log")
    idle = env.get(IDLE_ENV, str(DEFAULT_IDLE_SECONDS))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                *subprocess._args_from_interpreter_flags(),
                "-m",
                "flows.worker",
                "--socket",
                str(path),
                "--idle",
                idle,
                "--sys-path",
                json.dumps(sys.path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            # outlives this stage, and a Ctrl-C at the terminal is not for it
            start_new_session=True,
        )
    prefect_ready()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not path.exists():
        if proc.poll() is not None:
            raise _Unavailable(
                f"the worker exited with {proc.returncode} while starting; see {log}"
            )
        if time.monotonic() > deadline:
            proc.terminate()
            raise _Unavailable(
                f"the worker did not listen within {START_TIMEOUT_SECONDS:.0f} s; see {log}"
            )
        time.sleep(0.05)


def _stdio_fds() -> list[int]:
    """This process's stdin/stdout/stderr; a closed one is replaced by /dev/null, as the child
    expects all three."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


class _Relay:
    """This process's forwarded signals from before the request is sent: held until the child runs,
    then relayed to it. Installed later, a Ctrl-C between the child's start and the handlers would
    kill this client alone, and the worker would SIGTERM the stage instead of giving it its
    KeyboardInterrupt."""

    def __init__(self):
        self.held: list[int] = []
        self.remote: _Remote | None = None
        self.saved = {sig: signal.getsignal(sig) for sig in FORWARDED_SIGNALS}
        for sig, handler in self.saved.items():
            if handler != signal.SIG_IGN:  # ignored (nohup, `cmd &`): the child ignores it too
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.remote is None:
            self.held.append(signum)
        else:
            self.remote.forward(signum)

    def attach(self, remote: "_Remote") -> None:
        self.remote = remote
        while self.held:
            remote.forward(self.held.pop(0))

    def restore(self) -> None:
        """No child runs the stage: the handlers of before, and the held signals delivered to
        them."""
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        for sig in self.held:
            os.kill(os.getpid(), sig)


class _Remote:
    """A stage running in a worker's child: relays this process's signals to it and waits for its
    status."""

    def __init__(self, sock: socket.socket, replies, child: int):
        self.sock, self.replies, self.child = sock, replies, child

    def wait(self) -> int:
        try:
            line = self.replies.readline()
        except OSError:
            line = b""
        if not line:
            _kill_group(self.child, signal.SIGKILL)
            print(
                f"refvg: the stage worker died while running the stage (its "
                f"child {self.child} is killed); "
                f"run again, or with {SWITCH_ENV}=0 to run stages in-process",
                file=sys.stderr,
            )
            return 1
        status = json.loads(line)["status"]
        if status < 0:  # killed by a signal: die the same way, so DVC reports what happened
            if -status != signal.SIGKILL:  # (SIGKILL has no handler to reset)
                signal.signal(-status, signal.SIG_DFL)
            os.kill(os.getpid(), -status)
            return 128 - status
        return status

    def forward(self, signum: int) -> None:
        try:
            send_message(self.sock, {"signal": signum})
        except OSError:  # the worker is gone; the child must not outlive us
            _kill_group(self.child, signal.SIGKILL)


def _start_remote(sock: socket.socket, module: str, env: dict[str, str]) -> _Remote | str:
    """Hand the stage to the worker; a _Remote once its child runs, else why not (then nothing
    ran)."""
    request = {
        "op": "run",
        "module": module,
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "env": env,
        "sys_path": sys.path,
        "umask": _umask(),
        "started": _IMPORTED_AT,
        "client_pid": os.getpid(),
        "ignored_signals": [s for s in FORWARDED_SIGNALS if signal.getsignal(s) == signal.SIG_IGN],
    }
    relay = _Relay()
    try:
        send_request(sock, request, _stdio_fds())
        replies = sock.makefile("rb")
        first = json.loads(replies.readline() or b"{}")
    except (OSError, ValueError) as err:
        first = {"error": f"{type(err).__name__}: {err}"}
    if "pid" not in first:
        sock.close()
        relay.restore()
        return first.get("error", "the worker closed the connection")
    remote = _Remote(sock, replies, first["pid"])
    relay.attach(remote)
    return remote


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- management
# --------------------------------------------------------------------------------------------


def list_workers(folder: Path | None = None) -> list[dict]:
    """The workers that answer in `folder`: socket path, pid, idle seconds, running stages."""
    found = []
    for path in sorted((folder or runtime_dir()).glob("worker-*.sock")):
        sock = _try_connect(path)
        if sock is None:
            continue
        with sock:
            sock.settimeout(5)
            send_request(sock, {"op": "info"})
            found.append(
                {"socket": str(path), **json.loads(sock.makefile("rb").readline() or b"{}")}
            )
    return found


def stop_workers(folder: Path | None = None) -> int:
    """Ask every worker in `folder` to exit (running stages are terminated); returns how many were
    asked."""
    workers = list_workers(folder)
    for w in workers:
        sock = _try_connect(Path(w["socket"]))
        if sock is not None:
            with sock:
                send_request(sock, {"op": "stop"})
    return len(workers)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Manage this user's stage workers.")
    parser.add_argument("action", choices=["list", "stop"])
    if parser.parse_args().action == "stop":
        print(f"stopped {stop_workers()} worker(s)")
    else:
        for w in list_workers():
            print(json.dumps(w))
