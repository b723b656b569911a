"""The stage worker: a fork server with the pipeline's heavy libraries imported, serving
`flows.launcher`.

Started by the first stage process that finds none for its key (`python -m flows.worker --socket
PATH`), it imports `PRELOAD` (prefect, mlflow with the submodules the stages use, torch,
transformers, sqlalchemy, ...) and none of refvg's or flows' code, then listens. Per request it
forks a child that takes on the client's cwd, umask, environment, sys.path, argv and
stdin/stdout/stderr, imports the stage module fresh (so edits to the code are always picked up) and
runs its `main(argv)`; the worker reports the child's exit status to the client. If the client goes
away, the child's process group gets SIGTERM, then SIGKILL. A SIGTERM the client gets is forwarded
to the child's process group (training then stops at the next step with a checkpoint, exit 143); a
SIGTERM the worker itself gets (a scheduler signalling every process of a job) goes to every running
child too, with no SIGKILL of ours after it: the sender's grace period applies.

Fork safety: the worker opens no database connection and starts no thread of its own; the only
threads the imports start are OpenBLAS's (numpy) and jemalloc's (pyarrow, via mlflow), which both
re-initialise in a child through their own fork handlers. No torch op runs in the worker, so its
OpenMP pool does not exist yet and each child starts its own with the thread counts a fresh process
gets (the key holds the environment and CPU affinity they derive from).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import math
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from flows.launcher import send_message

# What the stages import, heaviest first. Importing them here is the whole point; a missing one (an
# optional dependency) is left to the stage.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "transformers.models.resnet.modeling_resnet",
    "transformers.models.swin.modeling_swin",
    "transformers.models.bert.tokenization_bert",
    "tokenizers",
    "torch.utils.serialization",
    "prefect",
    "prefect.flows",
    "prefect.tasks",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.cache_policies",
    "prefect.settings",
    "prefect.client.orchestration",
    "mlflow",
    "mlflow.tracking",
    "mlflow.entities",
    "mlflow.pyfunc",
    "mlflow.models",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.tracking.sqlalchemy_workspace_store",
    "mlflow.tracing.processor.otel",
    "mlflow.tracing.processor.base_mlflow",
    "mlflow.tracing.export.utils",
    "mlflow.tracing.utils.environment",
    "mlflow.models.display_utils",
    "opentelemetry.sdk.metrics",
    "git",  # GitPython: mlflow's git context when a model is logged
    "sqlalchemy",
    "sqlalchemy.dialects.sqlite",
    "alembic",
    "alembic.command",
    "alembic.config",
    "prefect.utilities.visualization",
    "anyio._backends._asyncio",
    "pydantic.v1",
    "numpy",
    "pandas",
    "PIL.Image",
    "PIL.ImageDraw",
    "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin",
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib.backends.backend_agg",
    "pycocotools.coco",
    "pycocotools.mask",
    "pydantic",
    "yaml",
    "tqdm",
    "psutil",
    "PIL.BmpImagePlugin",
    "PIL.GifImagePlugin",
    "PIL.PpmImagePlugin",
    "rich._emoji_codes",
    "tabulate",  # torch._dynamo's atexit handler imports it in every process that imported torch
)
# Our code: never kept in the worker, so a child imports the client's current copy.
PROJECT_PACKAGES = ("refvg", "flows")
KILL_GRACE_SECONDS = 5.0  # SIGTERM, then SIGKILL, for a child whose client went away


@dataclass
class Child:
    conn: socket.socket
    client_pid: int
    kill_at: float | None = None  # monotonic time of the SIGKILL after a SIGTERM
    connected: bool = True
    inbox: bytes = field(default=b"")


class Worker:
    def __init__(self, path: Path, idle_seconds: float):
        self.path, self.idle_seconds = path, idle_seconds
        self.children: dict[int, Child] = {}
        self.stopping = False
        # SIGTERM/SIGINT to the worker: children get SIGTERM and the sender's grace
        self.terminated = False
        self.last_active = time.monotonic()
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(
            signal.SIGCHLD, lambda *_: None
        )  # only to wake select() through the wakeup fd
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.listener = self._listen()
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")

    def _listen(self) -> socket.socket:
        # Bound under a temporary name and renamed: a client never connects to a socket not yet
        # listening.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp))
        os.chmod(tmp, 0o600)
        listener.listen(16)
        os.replace(tmp, self.path)
        self.inode = self.path.stat().st_ino
        return listener

    def _stop(self, *_):
        self.stopping = self.terminated = True

    def serve(self) -> None:
        log(f"listening on {self.path} (idle timeout {self.idle_seconds:.0f} s)")
        while True:
            for key, _ in self.sel.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    while _drain(self.wake_r):
                        pass
                else:
                    self._from_client(key.data)
            self._reap()
            now = time.monotonic()
            for pid, child in self.children.items():
                if child.kill_at is not None and now >= child.kill_at:
                    _signal_group(pid, signal.SIGKILL)
                    child.kill_at = float("inf")
            if self.children:
                self.last_active = now
            if not self._still_mine():
                self.stopping = True
            if self.stopping or now - self.last_active > self.idle_seconds:
                self._close_listener()
                if not self.children:
                    log("exiting")
                    return
                for pid, child in self.children.items():
                    if child.kill_at is None:
                        _signal_group(pid, signal.SIGTERM)
                        # Our own SIGKILL only when we decided to stop (idle, `stop`, socket
                        # gone): a preempted training stage needs its step and checkpoint write.
                        child.kill_at = math.inf if self.terminated else now + KILL_GRACE_SECONDS

    def _still_mine(self) -> bool:
        """False once our socket file was removed or replaced, or the project we serve (sys.path[0],
        part of our key) is gone, as DVC's temporary workspace of an experiment is once it ran: no
        client can reach us any more."""
        if self.listener is None:
            return True
        if sys.path and sys.path[0] and not os.path.isdir(sys.path[0]):
            return False
        try:
            return self.path.stat().st_ino == self.inode
        except OSError:
            return False

    def _close_listener(self) -> None:
        if self.listener is None:
            return
        if self._still_mine():
            self.path.unlink(missing_ok=True)  # first, so new clients start a new worker
        self.sel.unregister(self.listener)
        self.listener.close()
        self.listener = None

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)  # a client sends its request at once
        fds: list[int] = []
        try:
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            request = json.loads(conn.makefile("rb").readline() or b"{}")
        except (OSError, ValueError) as err:
            log(f"bad request: {type(err).__name__}: {err}")
            _close_all(fds)
            conn.close()
            return
        op = request.get("op")
        if op == "stop":
            self.stopping = True
        elif op == "info":
            send_message(
                conn,
                {
                    "pid": os.getpid(),
                    "idle_seconds": round(time.monotonic() - self.last_active, 1),
                    "running": [c.client_pid for c in self.children.values()],
                },
            )
        elif op == "run" and len(fds) == 3 and not self.stopping:
            self._fork(conn, request, fds)
            return
        else:
            send_message(
                conn,
                {
                    "error": "stopping"
                    if self.stopping
                    else f"cannot serve {op!r} with {len(fds)} fds"
                },
            )
        _close_all(fds)
        conn.close()

    def _fork(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork in a process with threads; ours are OpenBLAS's and
            # jemalloc's, which handle fork themselves (see the module docstring).
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            try:
                self._become_child(conn, request, fds)
                run_stage(request)  # exits
            except BaseException:  # noqa: BLE001 - setting up the child failed (e.g. its cwd is gone)
                traceback.print_exc()
            finally:
                os._exit(70)  # never return into the worker's loop
        _close_all(fds)
        self.last_active = time.monotonic()
        conn.setblocking(False)
        self.children[pid] = Child(conn, request.get("client_pid", 0))
        self.sel.register(conn, selectors.EVENT_READ, pid)
        try:
            send_message(conn, {"pid": pid})
        except OSError:  # the client is already gone
            self._client_gone(pid)

    def _become_child(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        """Shed everything of the worker: its sockets, its signal handling, its session."""
        os.setsid()  # its own process group, so a kill reaches what the stage starts too
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in request.get(
            "ignored_signals", []
        ):  # as the client inherited them (nohup, `cmd &`)
            signal.signal(sig, signal.SIG_IGN)
        for child in self.children.values():
            child.conn.close()
        if self.listener is not None:
            self.listener.close()
        self.sel.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        _close_all(fd for fd in fds if fd > 2)

    def _from_client(self, pid: int) -> None:
        child = self.children.get(pid)
        if child is None:
            return
        try:
            data = child.conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._client_gone(pid)
            return
        child.inbox += data
        while b"\n" in child.inbox:
            line, child.inbox = child.inbox.split(b"\n", 1)
            sig = json.loads(line).get("signal")
            if isinstance(sig, int):
                _signal_group(pid, sig)

    def _client_gone(self, pid: int) -> None:
        child = self.children[pid]
        if child.connected:
            child.connected = False
            self.sel.unregister(child.conn)
        if child.kill_at is None:
            log(f"client {child.client_pid} went away: terminating its stage (pid {pid})")
            _signal_group(pid, signal.SIGTERM)
            child.kill_at = time.monotonic() + KILL_GRACE_SECONDS

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.kill_at is not None:
                _signal_group(pid, signal.SIGKILL)  # what the stage started dies with it
            try:
                send_message(child.conn, {"status": os.waitstatus_to_exitcode(status)})
            except OSError:
                pass
            if child.connected:
                self.sel.unregister(child.conn)
            child.conn.close()


def run_stage(request: dict) -> None:
    """In the forked child: become the client's process, run the stage's main, exit as Python
    would."""
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path[:] = request["sys_path"]
    forget_project_modules()
    importlib.invalidate_caches()
    import tempfile

    tempfile.tempdir = None  # recomputed from this environment
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as a fresh interpreter decides it
    if (
        "numpy" in sys.modules
    ):  # a fresh process seeds numpy's global generator from the OS; so does each child
        sys.modules["numpy"].random.seed()
    code = 0
    try:
        launcher = importlib.import_module("flows.launcher")
        launcher.CLIENT_STARTED_AT = request["started"]
        importlib.import_module(request["module"]).main(request["argv"][1:])
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException as err:  # noqa: BLE001 - reported as the interpreter would, and as the exit status
        err = err.with_traceback(
            err.__traceback__.tb_next
        )  # shown from the stage's frame on, not ours
        sys.excepthook(type(err), err, err.__traceback__)
        # Python ends by SIGINT itself after an unhandled KeyboardInterrupt, so its parent sees the
        # signal.
        code = -signal.SIGINT if isinstance(err, KeyboardInterrupt) else 1
    # What the interpreter does at exit: wait for non-daemon threads, then run the atexit functions.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:  # like Python after an unhandled KeyboardInterrupt: end by the signal itself
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def forget_project_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in PROJECT_PACKAGES:
            del sys.modules[name]


def prewarm() -> None:
    """Fill the per-process caches of the preloaded libraries that every stage would fill the same
    way."""
    try:
        from mlflow.utils.requirements_utils import _init_modules_to_packages_map
    except ImportError:  # another mlflow version: the stages fill it themselves
        return
    # mlflow's log_model checks the model's requirements against the installed distributions,
    # mapping all their files to modules once per process (1-3 s here); that depends only on
    # sys.path and site-packages, both in the worker's key.
    _init_modules_to_packages_map()


def preload() -> list[str]:
    """Import PRELOAD; returns what could not be imported, and why. A stage that needs one of those
    imports it itself, and fails there as it would in its own process."""
    missing = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - an optional or broken library must not stop the worker
            missing.append(f"{name} ({type(err).__name__})")
    return missing


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def log(message: str) -> None:
    # Plain prints to the worker's log file: configuring logging here would leak handlers into every
    # child.
    print(
        f"{time.strftime('%H:%M:%S')} worker {os.getpid()}: {message}", file=sys.stderr, flush=True
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument(
        "--idle", type=float, default=600.0, help="exit after this many seconds without a stage"
    )
    ap.add_argument(
        "--sys-path", type=json.loads, help="the client's sys.path (JSON), which the key holds"
    )
    args = ap.parse_args()
    if args.sys_path:
        sys.path[:] = args.sys_path
    from refvg.tracking import disable_telemetry

    disable_telemetry()  # before prefect / mlflow are imported, as in a stage process
    forget_project_modules()
    t0 = time.perf_counter()
    missing = preload()
    prewarm()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        # A CUDA context does not survive fork: children could not use the GPU. Exiting sends
        # clients in-process.
        log("an import initialised CUDA; a forked child could not use the GPU: not serving")
        os._exit(3)
    threads = sorted(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else []
    log(
        f"imported {len(PRELOAD) - len(missing)} libraries in {time.perf_counter() - t0:.1f} s"
        + (f" (not imported: {', '.join(missing)})" if missing else "")
        + (f"; {len(threads)} OS threads" if threads else "")
    )
    Worker(args.socket, args.idle).serve()
    os._exit(0)  # nothing to flush; the interpreter's teardown of these libraries takes seconds


if __name__ == "__main__":
    main()
