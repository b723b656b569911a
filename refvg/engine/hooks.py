"""The training loop's side work, one hook per job: resume and checkpoints, the non-finite guard,
per-epoch validation and best-epoch selection, the per-epoch report, and preemption.

`refvg.engine.trainer.train` runs the steps; a hook sees the run's `LoopState` at four points:

    hook.before_train(state)
    for epoch ...:
        for batch ...:
            (one optimisation step)
            hook.after_step(state)
        hook.after_epoch(state)
    hook.after_train(state)

Hooks run in the order the trainer lists them, and that order is part of the contract: the
checkpointer resumes before the report replays the history; at a step the guard stops a diverging
run before a periodic checkpoint, which comes before a preemption check; at an epoch end validation
picks the best epoch before the checkpointer writes best.pt (through best.pt.next, published once
last.pt records it), and the report comes last.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from refvg.config import Config
from refvg.data.samplers import ResumableShuffle
from refvg.engine import distributed, preemption
from refvg.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_partial_writes,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

log = logging.getLogger(__name__)
LAST, BEST = "last.pt", "best.pt"
NEXT_BEST = "best.pt.next"  # a best epoch written, not yet recorded in last.pt
RESUME_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "position",
    "progress",
    "epoch",
    "history",
    "best_score",
    "best_epoch",
)
_RESUME_ONLY = ("optimizer", "scheduler", "rng", "position", "progress")  # best.pt is for inference


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a NaN/inf loss or gradient; the last good state is in last.pt."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = -1
    select_metric: str = "acc@0.5"  # the val metric best_score is of (weak methods: a box-free one)
    checkpoint_dir: Optional[Path] = None
    samples_per_second: float = 0.0
    compute_seconds: float = (
        0.0  # forward/backward/step and validation: the work, not the orchestration
    )
    resumed_from_epoch: int = 0
    resumed_from_step: int = 0  # steps into that epoch (0: resumed at an epoch boundary)
    skipped_steps: int = 0  # steps without an update because the loss or gradient was not finite

    @property
    def best_checkpoint(self) -> Path:
        return Path(self.checkpoint_dir) / BEST


@dataclass
class EpochProgress:
    """What the current epoch has done so far; checkpointed mid-epoch, so a resumed epoch reports
    the same figures as an uninterrupted one."""

    step: int = 0  # batches consumed, skipped ones included
    seen: int = 0
    loss_sum: float = 0.0
    parts_sum: dict = field(default_factory=dict)
    skipped: int = 0
    bad_in_a_row: int = 0


@dataclass
class LoopState:
    """What the hooks read and write: the run's objects, where it is, and what the last step and
    epoch gave."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: ResumableShuffle
    cfg: Config
    method: str
    out_dir: Path
    run_key: str
    device: torch.device
    local_batch: int
    steps_per_epoch: int
    result: TrainResult
    extra_state: dict
    main: bool = True  # rank 0: the one process that validates, writes and reports
    epoch: int = 0  # the epoch running (0-based) = epochs done before it
    progress: EpochProgress = field(default_factory=EpochProgress)
    batch: Optional[dict] = None  # the last step's batch
    losses: Optional[dict] = None  # its loss parts; None: the step was skipped (nothing updated)
    metrics: dict = field(
        default_factory=dict
    )  # the finished epoch's figures, filled by after_epoch hooks
    score: float = -math.inf  # its value of the select metric
    is_best: bool = False

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.progress.step

    def resume_state(self, epochs_done: int) -> dict:
        """Everything that decides the rest of the run, at this point of it."""
        consumed = min(self.progress.step * self.local_batch, len(self.sampler.epoch_share))
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "epoch": epochs_done,
            "run_key": self.run_key,
            "method": self.method,
            "config": self.cfg.model_dump(mode="json"),
            "history": self.result.history,
            "best_score": self.result.best_score,
            "best_epoch": self.result.best_epoch,
            **self.extra_state,
            "position": self.sampler.position(consumed),
            "progress": vars(self.progress).copy(),
        }

    def save_last(self) -> None:
        """last.pt mid-epoch (rank 0 writes). Every rank calls it (the points are decided alike on
        all ranks) and hands over its own running sums of the epoch: rank 0's alone would stand in
        for every rank's in a resumed epoch's figures."""
        shares = distributed.gather(vars(self.progress).copy())
        if self.main:
            save_checkpoint(
                {**self.resume_state(self.epoch), "rank_progress": shares}, self.out_dir / LAST
            )


class HookBase:
    """Side work at the loop's four points; each does nothing unless a hook overrides it."""

    def before_train(self, state: LoopState) -> None:
        pass

    def after_step(self, state: LoopState) -> None:
        pass

    def after_epoch(self, state: LoopState) -> None:
        pass

    def after_train(self, state: LoopState) -> None:
        pass


class Checkpointer(HookBase):
    """Resumes from last.pt when it belongs to this run; writes last.pt every `every_steps` steps
    (0: epoch ends only) and at each epoch end. An epoch that is the best so far is written to
    best.pt.next first, then last.pt (which records it as the best epoch), then renamed to best.pt:
    best.pt is always the epoch last.pt names, whatever write a kill cuts. Writing best.pt before
    last.pt left, after a kill between the two, a best.pt that last.pt did not name; a resumed run
    that validated that epoch lower the second time (nondeterministic kernels) kept it and reported
    another best epoch."""

    def __init__(self, every_steps: int):
        self.every_steps = every_steps

    def before_train(self, state: LoopState) -> None:
        for leftover in remove_partial_writes(state.out_dir) if state.main else ():
            log.warning(
                "removed %s, a checkpoint write cut short by a crash (the "
                "previous checkpoint is intact)",
                leftover,
            )
        if state.main:
            _settle_next_best(state.out_dir)
        _maybe_resume(state.out_dir / LAST, state)

    def after_step(self, state: LoopState) -> None:
        # the epoch's last step is saved by after_epoch, with the validation in it
        if (
            self.every_steps
            and state.global_step % self.every_steps == 0
            and state.progress.step < state.steps_per_epoch
        ):
            state.save_last()

    def after_epoch(self, state: LoopState) -> None:
        if not state.main:
            return
        ckpt = state.resume_state(state.epoch + 1)
        if state.is_best:
            best = {k: v for k, v in ckpt.items() if k not in _RESUME_ONLY}
            save_checkpoint(best, state.out_dir / NEXT_BEST)
        save_checkpoint(ckpt, state.out_dir / LAST)
        if state.is_best:
            (state.out_dir / NEXT_BEST).replace(state.out_dir / BEST)


def _settle_next_best(out_dir: Path) -> None:
    """A best.pt.next a kill left between an epoch end's writes: published as best.pt when last.pt
    records its epoch as the best (the kill came after last.pt), else removed (last.pt is still the
    point before that epoch's end, which the resumed run validates again)."""
    pending = out_dir / NEXT_BEST
    if not pending.exists():
        return
    try:
        epoch, key = (load_checkpoint(pending).get(k) for k in ("epoch", "run_key"))
        last = load_checkpoint(out_dir / LAST) if (out_dir / LAST).exists() else {}
    except CheckpointError:
        epoch, last = None, {}  # not whole or not ours: never published
    if epoch is not None and last.get("run_key") == key and last.get("best_epoch") == epoch:
        pending.replace(out_dir / BEST)
        log.warning("published %s as %s (a kill came after last.pt recorded it)", pending, BEST)
    else:
        pending.unlink()
        log.warning("removed %s, an epoch end a kill cut short (it is redone)", pending)


def _maybe_resume(path: Path, state: LoopState) -> None:
    if not path.exists():
        return
    try:
        ckpt = load_checkpoint(path)
        if ckpt.get("run_key") != state.run_key:
            log.warning(
                "%s belongs to another run (config, method or code changed); starting from scratch",
                path,
            )
            return
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path}: has the run's key but not {', '.join(missing)}")
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}; cannot resume from it. Move it away to train from scratch."
        ) from None
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    state.sampler.restore(ckpt["position"])  # the same batches, from the same place in the epoch
    result = state.result
    result.history = list(ckpt["history"])
    result.best_score, result.best_epoch = ckpt["best_score"], ckpt["best_epoch"]
    state.epoch = ckpt["epoch"]
    state.progress = EpochProgress(**_rank_share(ckpt.get("rank_progress") or [ckpt["progress"]]))
    result.resumed_from_epoch, result.resumed_from_step = state.epoch, state.progress.step
    result.skipped_steps = (
        sum(h.get("train/skipped_steps", 0) for h in result.history) + state.progress.skipped
    )
    log.info("resumed %s after %d epochs and %d steps", path, state.epoch, result.resumed_from_step)


def _rank_share(shares: list[dict]) -> dict:
    """This rank's progress in the checkpointed epoch: its own share when the checkpoint has one per
    rank; else (another world size, or an epoch boundary: one share) rank 0 carries all the running
    sums and the others none, so the epoch's totals stay right."""
    if len(shares) == distributed.world_size():
        return shares[distributed.rank()]
    share = dict(shares[0], seen=0, loss_sum=0.0, parts_sum={})
    if distributed.is_main():
        for s in shares:
            share["seen"] += s["seen"]
            share["loss_sum"] += s["loss_sum"]
            for k, v in s["parts_sum"].items():
                share["parts_sum"][k] = share["parts_sum"].get(k, 0.0) + v
    return share


class NonFiniteGuard(HookBase):
    """Counts the steps the trainer skipped (NaN/inf loss or gradient: no update, BatchNorm
    statistics put back); `max_bad_steps` in a row stop the run with the last good state in
    last.pt."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps

    def after_step(self, state: LoopState) -> None:
        progress, result = state.progress, state.result
        if state.losses is not None:
            progress.bad_in_a_row = 0
            return
        progress.skipped += 1
        progress.bad_in_a_row += 1
        result.skipped_steps += 1
        rows = state.batch["index"].tolist()
        log.warning(
            "%s epoch %d step %d: loss or gradient not finite; step "
            "skipped (%d in a row, %d this run; "
            "batch rows %s)",
            state.method,
            state.epoch + 1,
            progress.step,
            progress.bad_in_a_row,
            result.skipped_steps,
            _short(rows),
        )
        if progress.bad_in_a_row >= self.max_bad_steps:
            state.save_last()  # nothing was updated by the bad steps: this is the last good state
            raise NonFiniteLossError(
                f"{state.method}: the loss or gradient was not finite for "
                f"{progress.bad_in_a_row} steps in a row "
                f"(train.max_bad_steps={self.max_bad_steps}), the last at "
                f"epoch {state.epoch + 1} step "
                f"{progress.step} (batch rows {_short(rows)}). Stopped; the last good state is in "
                f"{state.out_dir / LAST} (lower train.lr, or check those samples)."
            )


def _short(rows: list[int], limit: int = 8) -> str:
    return str(rows[:limit])[:-1] + (", ...]" if len(rows) > limit else "]")


class Validation(HookBase):
    """`evaluate(model)` on rank 0 after each epoch (the others get its result); its numbers become
    the epoch's val/ metrics, and the epoch with the highest `select_metric` is the best."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], dict], select_metric: str):
        self.evaluate, self.select_metric = evaluate, select_metric

    def after_epoch(self, state: LoopState) -> None:
        t0 = time.perf_counter()
        val = distributed.from_main(self.evaluate(state.model) if state.main else None)
        seconds = time.perf_counter() - t0
        state.result.compute_seconds += seconds
        state.metrics.update({f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))})
        state.metrics["epoch_seconds"] += seconds
        state.result.history.append({"epoch": state.epoch + 1, **state.metrics})
        state.score = float(val.get(self.select_metric, -math.inf))
        state.is_best = state.score > state.result.best_score
        if state.is_best:
            state.result.best_score, state.result.best_epoch = state.score, state.epoch + 1


class EpochReport(HookBase):
    """A log line and `on_epoch_end(metrics, epoch)` per epoch (rank 0); on resume, the callback
    first gets every epoch restored from the checkpoint, so a tracker attached to the new process
    has the whole history."""

    def __init__(self, on_epoch_end: Callable[[dict, int], None], select_metric: str):
        self.on_epoch_end, self.select_metric = on_epoch_end, select_metric

    def before_train(self, state: LoopState) -> None:
        for h in state.result.history:
            self.on_epoch_end({k: v for k, v in h.items() if k != "epoch"}, h["epoch"])

    def after_epoch(self, state: LoopState) -> None:
        if not state.main:
            return
        m = state.metrics
        log.info(
            "%s epoch %d/%d loss %.4f val %s=%.4f (%.0f samples/s)",
            state.method,
            state.epoch + 1,
            state.cfg.train.epochs,
            m.get("train/loss", float("nan")),
            self.select_metric,
            state.score,
            m["samples_per_second"],
        )
        self.on_epoch_end(m, state.epoch + 1)


class Preemption(HookBase):
    """SIGTERM (refvg.engine.preemption): every rank stops at the same step boundary, last.pt
    written, and the run ends with `Preempted` (exit code 143)."""

    def after_step(self, state: LoopState) -> None:
        if distributed.all_ranks(not preemption.requested(), state.device):
            return
        state.save_last()
        message = (
            f"{state.method}: SIGTERM: stopped in epoch {state.epoch + 1} "
            f"after step {state.progress.step} "
            f"with a resumable checkpoint in {state.out_dir / LAST}; run "
            f"the same command again to resume "
            f"(exit code {preemption.PREEMPTED_EXIT_CODE})"
        )
        log.warning("%s", message)
        raise preemption.Preempted(message)
