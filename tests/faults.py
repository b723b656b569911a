"""Fault injectors shared by the tests and `benchmarks/faults.py`.

- `inject(...)`: the one place faults enter a training process (see there). `python -m tests.faults
train
  --faults JSON` is a training process with them: killing itself with SIGKILL (kill -9: no handler,
  no cleanup, no flush) while fetching the N-th training sample, half-way through its K-th
  checkpoint write, inside its N-th validation, or between the two checkpoint writes of an epoch's
  end. Run it with `train_process` (or `torchrun_train_process`); rerun the same command to resume.
- `python -m tests.faults teacher --kill-at-item N`: the `teacher` stage, killed the same way while
  fetching its N-th (image, caption) pair (`teacher_process`).
  `spawn_train_process(..., term_at_item=N, started=FILE)` starts one that, while fetching its N-th
  training sample, writes FILE and waits until a SIGTERM has arrived (the test sends it), so the
  preemption lands in a known step without any timing. `sitecustomize_dir` + FAULTS_ENV bring the
  same faults into the training of a `dvc repro` stage.
- `MlflowServer`: a real `mlflow server` process on loopback that a test can kill and start again.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.abc
import io
import json
import os
import pkgutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


FAULTS_ENV = (
    "REFVG_TEST_FAULTS"  # JSON of `inject`'s arguments, for a process started by another tool (DVC)
)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(
    kill_at_item: int = 0,
    kill_in_write: int = 0,
    kill_in_validation: int = 0,
    kill_after_validation_write: int = 0,
    term_at_item: int = 0,
    started: str = "",
) -> None:
    """Install faults into this (training) process: the one place they enter, through public seams
    only: the training split's `PreparedSplit.__getitem__`, `torch.save`, the `evaluate` callable
    handed to `refvg.engine.trainer.train`, and `refvg.engine.checkpoint.save_checkpoint` rebound
    wherever it was imported by name. Counts are 1-based and per process (under torchrun: per rank).

    kill_at_item: SIGKILL while fetching the N-th training sample.
    kill_in_write: the K-th `torch.save` writes half its bytes, fsyncs them, then SIGKILL.
    kill_in_validation: SIGKILL inside the N-th validation, once it has computed its scores and
      before the trainer sees them.
    kill_after_validation_write: after the N-th validation, SIGKILL right after the first
      checkpoint write that follows (best.pt.next when the epoch is the best so far, else last.pt):
      between the writes of that epoch's end.
    term_at_item: at the N-th training sample, write the pid to `started` and wait for a SIGTERM
      (the test sends it), so the preemption lands in a known step without any timing.
    """
    if kill_at_item or term_at_item:
        _on_train_item(kill_at_item, term_at_item, Path(started) if started else None)
    if kill_in_write:
        _half_write(kill_in_write)
    if kill_in_validation or kill_after_validation_write:
        _around_validation(kill_in_validation, kill_after_validation_write)


def _on_train_item(kill_at: int, term_at: int, started: Optional[Path]) -> None:
    from refvg.data.dataset import PreparedSplit
    from refvg.engine import preemption

    fetch, fetched = PreparedSplit.__getitem__, [0]

    def getitem(self, i):
        if self.split == "train":
            fetched[0] += 1
            if fetched[0] == kill_at:
                _die()
            if fetched[0] == term_at:
                started.write_text(str(os.getpid()))
                while not preemption.requested():  # the handler runs between these short waits
                    preemption._requested.wait(0.05)
        return fetch(self, i)

    PreparedSplit.__getitem__ = getitem


def _kill_at_caption_pair(n: int) -> None:
    """The teacher's training: SIGKILL while fetching its n-th (image, caption) pair."""
    from refvg.engine.teacher import CaptionPairs

    fetch, fetched = CaptionPairs.__getitem__, [0]

    def getitem(self, i):
        fetched[0] += 1
        if fetched[0] == n:
            _die()
        return fetch(self, i)

    CaptionPairs.__getitem__ = getitem


def _half_write(k: int) -> None:
    import torch

    save, writes = torch.save, [0]

    def half_save(obj, f, *args, **kwargs):
        writes[0] += 1
        if writes[0] < k:
            return save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: buf.tell() // 2])
        f.flush()
        os.fsync(f.fileno())
        _die()

    torch.save = half_save


def _around_validation(kill_in: int, kill_after_write: int) -> None:
    import refvg.engine
    from refvg.engine import checkpoint, trainer

    validations, armed = [0], [False]

    def watch(evaluate):
        def evaluated(model):
            scores = evaluate(model)
            validations[0] += 1
            if validations[0] == kill_in:
                _die()
            armed[0] = validations[0] == kill_after_write
            return scores

        return evaluated

    def train_watching(train):
        def train_(*args, evaluate, **kwargs):
            return train(*args, evaluate=watch(evaluate), **kwargs)

        return train_

    def save_then_die(save):
        def save_(state, path, *args, **kwargs):
            save(state, path, *args, **kwargs)
            if armed[0]:
                _die()

        return save_

    # Every module of the engine (subpackages included) imported first, so a name bound in any is
    # found below.
    for info in pkgutil.walk_packages(refvg.engine.__path__, "refvg.engine."):
        importlib.import_module(info.name)
    _rebind(trainer, "train", train_watching)
    _rebind(checkpoint, "save_checkpoint", save_then_die)


def _rebind(home, name: str, wrap: Callable) -> None:
    """Replace `home.name` by `wrap(it)` there and in every loaded refvg module that imported it by
    name."""
    original = getattr(home, name)
    wrapped = functools.wraps(original)(wrap(original))
    for module_name, module in list(sys.modules.items()):
        if module_name.split(".")[0] == "refvg" and getattr(module, name, None) is original:
            setattr(module, name, wrapped)


class _InjectOnImport(importlib.abc.MetaPathFinder):
    """Calls `inject(**json of FAULTS_ENV)` each time `refvg.stages` is (re)imported in a process
    whose environment has FAULTS_ENV at that moment. Installed at interpreter start
    (`sitecustomize_dir`), it reaches the training in a DVC stage: in a stage worker's child, which
    imports the stage code fresh with the environment of the process DVC started."""

    TRIGGER = "refvg.stages"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.TRIGGER or not os.environ.get(FAULTS_ENV):
            return None
        for finder in sys.meta_path:
            found = (
                None
                if finder is self
                else getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            )
            if found is not None:
                break
        else:
            return None
        exec_module = found.loader.exec_module

        def exec_then_inject(module):
            exec_module(module)
            inject(**json.loads(os.environ[FAULTS_ENV]))

        found.loader.exec_module = exec_then_inject
        return found


def install_on_import() -> None:
    if not any(isinstance(f, _InjectOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _InjectOnImport())


def sitecustomize_dir(folder: Path) -> Path:
    """A folder for PYTHONPATH whose sitecustomize.py installs `_InjectOnImport` in every Python
    process started with it (DVC's stage processes, the stage worker and its children); FAULTS_ENV
    in a process's environment then says which faults its training gets."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Loaded by its path, under its own name: sys.path stays the process's own, and a `tests`
    # package of site-packages cannot stand in for this one.
    (folder / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('refvg_test_faults', {__file__!r})\n"
        "faults = sys.modules['refvg_test_faults'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(faults)\n"
        "faults.install_on_import()\n"
    )
    return folder


def _train_cmd(
    method: str,
    kill_at_item: int = 0,
    kill_in_write: int = 0,
    term_at_item: int = 0,
    started: Optional[Path] = None,
    **faults: int,
) -> tuple[list[str], dict]:
    faults = {
        "kill_at_item": kill_at_item,
        "kill_in_write": kill_in_write,
        "term_at_item": term_at_item,
        "started": str(started or ""),
        **faults,
    }
    cmd = [
        sys.executable,
        "-m",
        "tests.faults",
        "train",
        "--method",
        method,
        "--faults",
        json.dumps(faults),
    ]
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return cmd, {**os.environ, "PYTHONPATH": pythonpath}


def spawn_train_process(
    workdir: Path,
    log: Path,
    method: str = "transvg",
    term_at_item: int = 0,
    started: Optional[Path] = None,
    via_worker: bool = False,
    env: Optional[dict] = None,
) -> subprocess.Popen:
    """`refvg train` started in the background (stdout and stderr to `log`); see `term_at_item`
    above. `via_worker`: run as a stage process does, in a stage worker's child
    (flows/launcher.py)."""
    cmd, base_env = _train_cmd(method, term_at_item=term_at_item, started=started)
    cmd += ["--via-worker"] if via_worker else []
    env = {**base_env, **(env or {})}
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )


def train_process(
    workdir: Path,
    method: str = "transvg",
    kill_at_item: int = 0,
    kill_in_write: int = 0,
    timeout: float = 600,
    **faults: int,
) -> subprocess.CompletedProcess:
    """`refvg train` in a fresh Python process in `workdir`, optionally with the faults of
    `inject`."""
    cmd, env = _train_cmd(method, kill_at_item, kill_in_write, **faults)
    return subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


def torchrun_train_process(
    workdir: Path, nproc: int = 2, method: str = "transvg", timeout: float = 600, **faults: int
) -> subprocess.CompletedProcess:
    """The same under `torchrun --standalone` with `nproc` CPU ranks (gloo), each rank with the
    faults."""
    cmd, env = _train_cmd(method, **faults)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *cmd[1:],
    ]
    return subprocess.run(
        cmd,
        cwd=workdir,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _train_main(args) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    inject(**json.loads(args.faults))
    from refvg import stages
    from refvg.config import load_config

    result = stages.train_method(load_config("params.yaml"), args.method)
    print(
        json.dumps(
            {
                "resumed_from_epoch": result.resumed_from_epoch,
                "resumed_from_step": result.resumed_from_step,
                "best_epoch": result.best_epoch,
                "best_score": result.best_score,
            }
        )
    )


def teacher_process(
    workdir: Path, kill_at_item: int = 0, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The `teacher` stage in a fresh Python process in `workdir`, optionally SIGKILLed while
    fetching its `kill_at_item`-th training pair; prints its final figures as JSON."""
    cmd = [sys.executable, "-m", "tests.faults", "teacher", "--kill-at-item", str(kill_at_item)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


def _teacher_main(args) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.kill_at_item:
        _kill_at_caption_pair(args.kill_at_item)
    from refvg import stages
    from refvg.config import load_config

    result = stages.teacher(load_config("params.yaml"))
    print(
        json.dumps({"corpus": result["corpus"], "val": result["val"], "history": result["history"]})
    )


def log_process(workdir: Path, stage: str, steps: int, env: dict) -> subprocess.Popen:
    """A stage process that only logs: one MLflow run, `steps` metric batches (what a pipeline stage
    does, minus the work). Several at once on one store are two pipelines logging concurrently."""
    cmd = [sys.executable, "-m", "tests.faults", "log", "--stage", stage, "--steps", str(steps)]
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _log_main(args) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from refvg.config import load_config
    from refvg.tracking import stage_run

    with stage_run(load_config("params.yaml"), args.stage, params={"stage": args.stage}) as tracker:
        for step in range(1, args.steps + 1):
            tracker.log_metrics({"loss": 1.0 / step, "acc": step / args.steps}, step=step)
    print(
        json.dumps(
            {
                "run_id": tracker.run_id,
                "failures": tracker.failures,
                "pending": len(tracker.pending),
            }
        )
    )


def poison_loss(model, bad_calls: set[int], where: str = "loss") -> None:
    """Make the loss (where="loss") or only the gradient (where="grad": a finite loss whose gradient
    is d sqrt(x)/dx at 0 = inf) non-finite on the given calls of `model.compute_loss` (1-based)."""
    import torch

    compute, calls = model.compute_loss, [0]

    def poisoned(outputs, batch):
        calls[0] += 1
        losses = compute(outputs, batch)
        if calls[0] in bad_calls:
            if where == "loss":
                losses["loss"] = losses["loss"] * float("nan")
            else:
                losses["loss"] = losses["loss"] + torch.sqrt(outputs.pred_boxes.sum() * 0)
        return losses

    model.compute_loss = poisoned


def small_training(folder: Path, **overrides):
    """The tiny model on 16 training samples in batches of 4 (4 steps per epoch, 2 epochs): the
    training loop's logic at a fraction of a full run's cost. `folder` holds the tiny dataset
    (tests' `in_tiny`); its params.yaml is rewritten. Returns (cfg, a function giving identically
    initialised models, the data)."""
    import torch
    from torch.utils.data import Subset

    from refvg.config import load_config
    from refvg.data.dataset import PreparedSplit, read_manifest
    from refvg.data.prepare import prepared_path
    from refvg.models import build_model
    from tests.helpers import write_params

    train = {"epochs": 2, "batch_size": 4, **overrides.pop("train", {})}
    cfg = load_config(write_params(folder, train=train, **overrides))
    prepared = prepared_path(cfg)
    manifest = read_manifest(prepared)

    def model():
        torch.manual_seed(0)
        return build_model("transvg", cfg, manifest["vocab_size"], manifest["pad_token_id"])

    return cfg, model, Subset(PreparedSplit(prepared, "train"), range(16))


def blocked_sqlite_store(folder: Path) -> tuple[Path, str]:
    """(blocker, uri): an sqlite store MLflow cannot open until `blocker` is deleted, because a file
    sits where the store's folder must go. A real unreachable store, no mock."""
    blocker = Path(folder) / "store"
    blocker.write_text("a file, not the store's folder")
    return blocker, f"sqlite:///{blocker / 'mlruns.db'}"


def truncated_jpeg(image_path: Path, keep: float) -> bytes:
    """The image re-encoded as JPEG, cut to the first `keep` fraction of its bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(image_path).convert("RGB").save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: int(len(data) * keep)]


# ---------------------------------------------------------------- a real MLflow tracking server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over an sqlite store in `folder`; `kill()` is kill -9, `start()`
    brings it back on the same port and store (what a restarted tracking server looks like to its
    clients)."""

    def __init__(self, folder: Path, port: Optional[int] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 600) -> "MlflowServer":
        # Waits for the server's /health (or its exit); the timeout is a ceiling for a hang, not a
        # race: on a loaded 2-core machine a start has taken minutes.
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={
                **os.environ,
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
        )  # no background job workers: seconds off the start
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode}; see "
                    f"{self.folder / 'server.log'}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(
            f"mlflow server did not answer within {timeout:.0f} s; see {self.folder / 'server.log'}"
        )

    def kill(self) -> None:
        """kill -9 of the server and its workers (its own process group, started by us)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def log_then_kill_server(
    tracker, server: MlflowServer, kill_after_epoch: int = 1
) -> tuple[Callable, list[float]]:
    """An `on_epoch_end` that logs each epoch's metrics through `tracker` and kills `server` (kill
    -9) once epoch `kill_after_epoch` is logged; returns it and the list it fills with each log
    call's seconds (how long a dead server stalls an epoch)."""
    stalls: list[float] = []

    def on_epoch_end(metrics: dict, epoch: int) -> None:
        t0 = time.perf_counter()
        tracker.log_metrics(metrics, step=epoch)
        stalls.append(time.perf_counter() - t0)
        if epoch == kill_after_epoch:
            server.kill()

    return on_epoch_end, stalls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="refvg train in this folder, optionally killing itself")
    p.add_argument("--method", default="transvg")
    p.add_argument("--faults", default="{}", help="JSON of inject()'s arguments")
    p = sub.add_parser(
        "teacher", help="the teacher stage in this folder, optionally killing itself"
    )
    p.add_argument(
        "--kill-at-item",
        type=int,
        default=0,
        help="SIGKILL while fetching this training pair (1-based)",
    )
    p = sub.add_parser("log", help="a stage that only logs to MLflow")
    p.add_argument("--stage", required=True)
    p.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    {"train": _train_main, "teacher": _teacher_main, "log": _log_main}[args.command](args)


if __name__ == "__main__":
    # as a DVC stage runs: through the warm stage worker (flows/launcher.py)
    if "--via-worker" in sys.argv:
        from flows.launcher import launch

        sys.argv.remove("--via-worker")
        launch("tests.faults", main)
    main()
