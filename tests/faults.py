"""Fault injectors shared by the tests and `benchmarks/faults.py`.

- `python -m tests.faults train ...`: a training process that kills itself with SIGKILL (kill -9: no handler,
  no cleanup, no flush) at a chosen point: while fetching the N-th training sample, or half-way through its
  K-th checkpoint write. Run it with `train_process`; rerun the same command to resume.
- `python -m tests.faults teacher --kill-at-item N`: the `teacher` stage, killed the same way while
  fetching its N-th (image, caption) pair (`teacher_process`).
  `spawn_train_process(..., term_at_item=N, started=FILE)` starts one that, while fetching its N-th
  training sample, writes FILE and waits until a SIGTERM has arrived (the test sends it), so the
  preemption lands in a known step without any timing.
- `MlflowServer`: a real `mlflow server` process on loopback that a test can kill and start again.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_item(n: int) -> None:
    from refvg.data.dataset import PreparedSplit

    fetch, fetched = PreparedSplit.__getitem__, [0]

    def getitem(self, i):
        if self.split == "train":
            fetched[0] += 1
            if fetched[0] == n:
                _die()
        return fetch(self, i)

    PreparedSplit.__getitem__ = getitem


def _kill_at_caption_pair(n: int) -> None:
    """The teacher's training: SIGKILL while fetching its n-th (image, caption) pair."""
    from refvg.models.clip_teacher import CaptionPairs

    fetch, fetched = CaptionPairs.__getitem__, [0]

    def getitem(self, i):
        fetched[0] += 1
        if fetched[0] == n:
            _die()
        return fetch(self, i)

    CaptionPairs.__getitem__ = getitem


def _kill_in_write(k: int) -> None:
    """The k-th checkpoint write stops half-way through its bytes, then the process dies."""
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


def _wait_for_sigterm_at_item(n: int, started: Path) -> None:
    from refvg.data.dataset import PreparedSplit
    from refvg.engine import preemption

    fetch, fetched = PreparedSplit.__getitem__, [0]

    def getitem(self, i):
        if self.split == "train":
            fetched[0] += 1
            if fetched[0] == n:
                started.write_text(str(os.getpid()))
                while not preemption.requested():  # the handler runs between these short waits
                    preemption._requested.wait(0.05)
        return fetch(self, i)

    PreparedSplit.__getitem__ = getitem


def _train_cmd(method: str, kill_at_item: int = 0, kill_in_write: int = 0, term_at_item: int = 0,
               started: Optional[Path] = None) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "tests.faults", "train", "--method", method,
           "--kill-at-item", str(kill_at_item), "--kill-in-write", str(kill_in_write),
           "--term-at-item", str(term_at_item), "--started", str(started or "")]
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return cmd, {**os.environ, "PYTHONPATH": pythonpath}


def spawn_train_process(workdir: Path, log: Path, method: str = "transvg", term_at_item: int = 0,
                        started: Optional[Path] = None, via_worker: bool = False,
                        env: Optional[dict] = None) -> subprocess.Popen:
    """`refvg train` started in the background (stdout and stderr to `log`); see `term_at_item`
    above. `via_worker`: run as a stage process does, in a stage worker's child
    (flows/launcher.py)."""
    cmd, base_env = _train_cmd(method, term_at_item=term_at_item, started=started)
    cmd += ["--via-worker"] if via_worker else []
    env = {**base_env, **(env or {})}
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                text=True)


def train_process(workdir: Path, method: str = "transvg", kill_at_item: int = 0, kill_in_write: int = 0,
                  timeout: float = 600) -> subprocess.CompletedProcess:
    """`refvg train` in a fresh Python process in `workdir`, optionally killed as described above."""
    cmd, env = _train_cmd(method, kill_at_item, kill_in_write)
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def _train_main(args) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.kill_at_item:
        _kill_at_item(args.kill_at_item)
    if args.kill_in_write:
        _kill_in_write(args.kill_in_write)
    if args.term_at_item:
        _wait_for_sigterm_at_item(args.term_at_item, Path(args.started))
    from refvg import stages
    from refvg.config import load_config

    result = stages.train_method(load_config("params.yaml"), args.method)
    print(json.dumps({"resumed_from_epoch": result.resumed_from_epoch, "resumed_from_step": result.resumed_from_step,
                      "best_epoch": result.best_epoch, "best_score": result.best_score}))


def teacher_process(workdir: Path, kill_at_item: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    """The `teacher` stage in a fresh Python process in `workdir`, optionally SIGKILLed while fetching
    its `kill_at_item`-th training pair; prints its final figures as JSON."""
    cmd = [sys.executable, "-m", "tests.faults", "teacher", "--kill-at-item", str(kill_at_item)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def _teacher_main(args) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.kill_at_item:
        _kill_at_caption_pair(args.kill_at_item)
    from refvg import stages
    from refvg.config import load_config

    result = stages.teacher(load_config("params.yaml"))
    print(json.dumps({"corpus": result["corpus"], "val": result["val"], "history": result["history"]}))


def log_process(workdir: Path, stage: str, steps: int, env: dict) -> subprocess.Popen:
    """A stage process that only logs: one MLflow run, `steps` metric batches (what a pipeline stage does,
    minus the work). Several at once on one store are two pipelines logging concurrently."""
    cmd = [sys.executable, "-m", "tests.faults", "log", "--stage", stage, "--steps", str(steps)]
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _log_main(args) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from refvg.config import load_config
    from refvg.tracking import stage_run

    with stage_run(load_config("params.yaml"), args.stage, params={"stage": args.stage}) as tracker:
        for step in range(1, args.steps + 1):
            tracker.log_metrics({"loss": 1.0 / step, "acc": step / args.steps}, step=step)
    print(json.dumps({"run_id": tracker.run_id, "failures": tracker.failures, "pending": len(tracker.pending)}))


def poison_loss(model, bad_calls: set[int], where: str = "loss") -> None:
    """Make the loss (where="loss") or only the gradient (where="grad": a finite loss whose gradient is
    d sqrt(x)/dx at 0 = inf) non-finite on the given calls of `model.compute_loss` (1-based)."""
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
    """The tiny model on 16 training samples in batches of 4 (4 steps per epoch, 2 epochs): the training
    loop's logic at a fraction of a full run's cost. `folder` holds the tiny dataset (tests' `in_tiny`); its
    params.yaml is rewritten. Returns (cfg, a function giving identically initialised models, the data)."""
    import torch
    from torch.utils.data import Subset

    from refvg.config import load_config
    from refvg.data.dataset import PreparedSplit, read_manifest
    from refvg.data.prepare import prepared_path
    from refvg.models import build_model
    from tests.conftest import write_params

    train = {"epochs": 2, "batch_size": 4, **overrides.pop("train", {})}
    cfg = load_config(write_params(folder, train=train, **overrides))
    prepared = prepared_path(cfg)
    manifest = read_manifest(prepared)

    def model():
        torch.manual_seed(0)
        return build_model("transvg", cfg, manifest["vocab_size"], manifest["pad_token_id"])

    return cfg, model, Subset(PreparedSplit(prepared, "train"), range(16))


def blocked_sqlite_store(folder: Path) -> tuple[Path, str]:
    """(blocker, uri): an sqlite store MLflow cannot open until `blocker` is deleted, because a file sits
    where the store's folder must go. A real unreachable store, no mock."""
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
    """`mlflow server` on 127.0.0.1 over an sqlite store in `folder`; `kill()` is kill -9, `start()` brings it
    back on the same port and store (what a restarted tracking server looks like to its clients)."""

    def __init__(self, folder: Path, port: Optional[int] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 600) -> "MlflowServer":
        # Waits for the server's /health (or its exit); the timeout is a ceiling for a hang, not a race:
        # on a loaded 2-core machine a start has taken minutes.
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no background job workers: seconds off the start
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {self.folder / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s; see {self.folder / 'server.log'}")

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


def log_then_kill_server(tracker, server: MlflowServer, kill_after_epoch: int = 1) -> tuple[Callable, list[float]]:
    """An `on_epoch_end` that logs each epoch's metrics through `tracker` and kills `server` (kill -9) once
    epoch `kill_after_epoch` is logged; returns it and the list it fills with each log call's seconds (how
    long a dead server stalls an epoch)."""
    stalls: list[float] = []

    def on_epoch_end(metrics: dict, epoch: int) -> None:
        t0 = time.perf_counter()
        tracker.log_metrics(metrics, step=epoch)
        stalls.append(time.perf_counter() - t0)
        if epoch == kill_after_epoch:
            server.kill()

    return on_epoch_end, stalls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="refvg train in this folder, optionally killing itself")
    p.add_argument("--method", default="transvg")
    p.add_argument("--kill-at-item", type=int, default=0, help="SIGKILL while fetching this training sample (1-based)")
    p.add_argument("--kill-in-write", type=int, default=0, help="SIGKILL half-way through this checkpoint write")
    p.add_argument("--term-at-item", type=int, default=0,
                   help="at this training sample, write --started and wait for a SIGTERM")
    p.add_argument("--started", default="", help="the file --term-at-item writes")
    p = sub.add_parser("teacher", help="the teacher stage in this folder, optionally killing itself")
    p.add_argument("--kill-at-item", type=int, default=0, help="SIGKILL while fetching this training pair (1-based)")
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
