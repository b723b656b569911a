"""The training loop, in one place: AdamW, warmup + cosine/step schedule, grad clipping, bf16 autocast on
CUDA, per-epoch validation, atomic checkpoints with optimizer/scheduler/RNG state, and resume. Under
`torchrun` the same loop runs data-parallel (refvg.engine.distributed).

Crash safety: last.pt is written at every epoch end and every `train.checkpoint_every_steps` steps, with
everything that decides the rest of the run (weights, optimizer, schedule, RNG states, the position in the
epoch's data order, the epoch's running sums), so a run killed at any point and started again ends bitwise
where the uninterrupted run ends (on CPU). A step whose loss or gradient norm is not finite is skipped (no
update) and counted; `train.max_bad_steps` of them in a row stop the run with the last good state saved.
SIGTERM (preemption) stops the run at the next step boundary with last.pt written and exit code 143
(refvg.engine.preemption).

Tracking stays outside: the caller passes `on_epoch_end(metrics, epoch)` (the flows hook MLflow there), so
this module runs the same under a test, a notebook, DVC, Prefect or torchrun.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from refvg.config import Config, TrainConfig
from refvg.data.dataset import collate
from refvg.data.samplers import ResumableShuffle
from refvg.engine import distributed, preemption
from refvg.engine.checkpoint import (
    CheckpointError, load_checkpoint, remove_partial_writes, rng_state, save_checkpoint, set_rng_state,
)
from refvg.engine.runtime import CPU_SHARE, autocast, resolve_device, seed_everything, to_device

log = logging.getLogger(__name__)
LAST, BEST = "last.pt", "best.pt"
RESUME_KEYS = ("model", "optimizer", "scheduler", "rng", "position", "progress", "epoch", "history", "best_score",
               "best_epoch")
# Knobs that decide how a run is checkpointed, guarded or reported, not what it computes: changing them must
# not throw a run's progress away.
RESUME_NEUTRAL = {"train": ("checkpoint_every_steps", "max_bad_steps"), "tracking": None}


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
    compute_seconds: float = 0.0  # forward/backward/step and validation: the work, not the orchestration
    resumed_from_epoch: int = 0
    resumed_from_step: int = 0  # steps into that epoch (0: resumed at an epoch boundary)
    skipped_steps: int = 0  # steps without an update because the loss or gradient was not finite

    @property
    def best_checkpoint(self) -> Path:
        return Path(self.checkpoint_dir) / BEST


def lr_lambda(tcfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine to zero, step decay (x0.1 at each milestone) or constant."""
    warmup = min(tcfg.warmup_steps, max(total_steps - 1, 0))
    milestones = [int(m * total_steps) for m in tcfg.step_milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if tcfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if tcfg.schedule == "step":
            return 0.1 ** sum(step >= m for m in milestones)
        return 1.0

    return factor


def build_optimizer(model: torch.nn.Module, tcfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = model.param_groups(tcfg.lr, tcfg.lr_backbone, tcfg.weight_decay)
    return torch.optim.AdamW(groups, lr=tcfg.lr, fused=device.type == "cuda")


@dataclass
class _EpochProgress:
    """What the current epoch has done so far; checkpointed mid-epoch, so a resumed epoch reports the same
    figures as an uninterrupted one."""

    step: int = 0  # batches consumed, skipped ones included
    seen: int = 0
    loss_sum: float = 0.0
    parts_sum: dict = field(default_factory=dict)
    skipped: int = 0
    bad_in_a_row: int = 0


def run_key(cfg: Config, method: str, data_version: str = "") -> str:
    """Identifies what a checkpoint was trained for (method, config, library code, data); resume only
    continues a run with the same key. Code and data are part of it because DVC keeps the checkpoint folder
    between runs: a changed model or dataset must not pick up weights trained on the old one."""
    dumped = cfg.model_dump(mode="json")
    for section, keys in RESUME_NEUTRAL.items():
        if keys is None:
            dumped.pop(section, None)
        else:
            for k in keys:
                dumped[section].pop(k, None)
    blob = json.dumps({"method": method, "cfg": dumped, "code": code_fingerprint(), "data": data_version},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def code_fingerprint() -> str:
    """Hash of the refvg package's Python sources."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@preemption.stops_on_sigterm
def train(
    model: torch.nn.Module,
    train_set: Dataset,
    cfg: Config,
    out_dir: Path,
    *,
    method: str,
    evaluate: Callable[[torch.nn.Module], dict],
    select_metric: str = "acc@0.5",
    on_epoch_end: Callable[[dict, int], None] = lambda metrics, epoch: None,
    extra_state: Optional[dict] = None,
    data_version: str = "",
) -> TrainResult:
    """Train `model` on `train_set` for `cfg.train.epochs`; `evaluate(model)` scores it after each epoch and
    the best epoch by `select_metric` is kept as best.pt. Resumes from out_dir/last.pt when it belongs to the
    same run (same method, config, code and `data_version`), mid-epoch included. `on_epoch_end(metrics,
    epoch)` is called after each epoch and, on resume, once for each epoch restored from the checkpoint, so a
    tracker attached to the new process still gets the whole history."""
    tcfg = cfg.train
    out_dir = Path(out_dir)
    device = distributed.setup(resolve_device(tcfg.device))  # under torchrun: join the group, this rank's GPU
    main = distributed.is_main()  # only rank 0 logs, validates and writes checkpoints
    seed_everything(tcfg.seed)
    CPU_SHARE.enter()  # its share of the cores while other trainings run beside it (until the end)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    step_model = distributed.wrap(model, device)
    step_model = torch.compile(step_model) if tcfg.compile else step_model

    # Every rank draws the same order and takes its interleaved share (rank::world): the ranks' k-th batches
    # together are the k-th global batch of one process with train.batch_size.
    sampler = ResumableShuffle(len(train_set), tcfg.seed, rank=distributed.rank(), world=distributed.world_size())
    local_batch = distributed.local_batch_size(tcfg.batch_size)
    loader = DataLoader(
        train_set, batch_size=local_batch, sampler=sampler, drop_last=len(train_set) > tcfg.batch_size,
        collate_fn=collate, num_workers=tcfg.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=tcfg.num_workers > 0, generator=torch.Generator().manual_seed(tcfg.seed),
    )
    steps_per_epoch = len(loader)
    total_steps = tcfg.epochs * steps_per_epoch
    optimizer = build_optimizer(model, tcfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
    key = run_key(cfg, method, data_version)
    result = TrainResult(checkpoint_dir=out_dir, select_metric=select_metric)
    for leftover in remove_partial_writes(out_dir) if main else ():
        log.warning("removed %s, a checkpoint write cut short by a crash (the previous checkpoint is intact)", leftover)
    start_epoch, progress = _maybe_resume(out_dir / LAST, key, model, optimizer, scheduler, sampler, result)
    for h in result.history:
        on_epoch_end({k: v for k, v in h.items() if k != "epoch"}, h["epoch"])

    def resume_state(epochs_done: int, progress: _EpochProgress) -> dict:
        state = _state(model, optimizer, scheduler, epochs_done, key, result, cfg, method, extra_state)
        state["position"] = sampler.position(min(progress.step * local_batch, len(sampler.epoch_share)))
        state["progress"] = vars(progress).copy()
        return state

    def save_last(epochs_done: int, progress: _EpochProgress) -> None:
        # Every rank calls it (where is decided alike on all ranks) and hands over its own running sums of
        # the epoch: rank 0's alone would stand in for every rank's in a resumed epoch's figures.
        shares = distributed.gather(vars(progress).copy())
        if main:
            save_checkpoint({**resume_state(epochs_done, progress), "rank_progress": shares}, out_dir / LAST)

    for epoch in range(start_epoch, tcfg.epochs):
        model.train()
        t0 = time.perf_counter()
        # disable=None: a live bar on a terminal, nothing in logs (the per-epoch line below is logged anyway)
        bar = tqdm(loader, desc=f"{method} epoch {epoch + 1}/{tcfg.epochs}", leave=False, dynamic_ncols=True,
                   disable=None if main else True, mininterval=1.0)
        for batch in bar:
            progress.step += 1
            CPU_SHARE.refresh()
            losses = _train_step(model, step_model, to_device(batch, device), optimizer, scheduler, tcfg, device)
            if losses is None:
                _count_bad_step(progress, result, batch, epoch, tcfg, method, out_dir, save_last)
            else:
                progress.bad_in_a_row = 0
                n = batch["image"].shape[0]  # weakly supervised batches carry no box
                progress.seen += n
                progress.loss_sum += losses["loss"] * n
                for k, v in losses.items():
                    progress.parts_sum[k] = progress.parts_sum.get(k, 0.0) + v * n
                bar.set_postfix(loss=f"{progress.loss_sum / max(progress.seen, 1):.4f}",
                                sps=f"{progress.seen / (time.perf_counter() - t0):.0f}")
            global_step = epoch * steps_per_epoch + progress.step
            if tcfg.checkpoint_every_steps and global_step % tcfg.checkpoint_every_steps == 0 \
                    and progress.step < steps_per_epoch:
                save_last(epoch, progress)
            if _preempted(device):  # every rank stops at the same step
                save_last(epoch, progress)
                raise _stopped(method, epoch, progress.step, out_dir)
        totals = distributed.sum_over_ranks({"seen": progress.seen, **progress.parts_sum}, device)
        seen = totals.pop("seen")
        train_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        val = distributed.from_main(evaluate(model) if main else None)
        val_seconds = time.perf_counter() - t1
        result.compute_seconds += train_seconds + val_seconds
        metrics = {f"train/{k}": v / max(seen, 1) for k, v in totals.items()}
        metrics["train/skipped_steps"] = progress.skipped
        metrics.update({f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))})
        metrics.update({
            "lr": scheduler.get_last_lr()[0], "samples_per_second": seen / train_seconds,
            "epoch_seconds": train_seconds + val_seconds,
        })
        result.history.append({"epoch": epoch + 1, **metrics})
        score = float(val.get(select_metric, -math.inf))
        is_best = score > result.best_score
        if is_best:
            result.best_score, result.best_epoch = score, epoch + 1
        progress = _EpochProgress(bad_in_a_row=progress.bad_in_a_row)  # "in a row" spans epochs
        if not main:
            continue
        state = resume_state(epoch + 1, progress)
        if is_best:  # before last.pt: the resume point must never record a best epoch that is not on disk
            save_checkpoint({k: v for k, v in state.items() if k not in _RESUME_ONLY}, out_dir / BEST)
        save_checkpoint(state, out_dir / LAST)
        log.info("%s epoch %d/%d loss %.4f val %s=%.4f (%.0f samples/s)", method, epoch + 1, tcfg.epochs,
                 metrics.get("train/loss", float("nan")), select_metric, score, metrics["samples_per_second"])
        on_epoch_end(metrics, epoch + 1)

    trained = [h["samples_per_second"] for h in result.history[result.resumed_from_epoch:]]
    result.samples_per_second = sum(trained) / len(trained) if trained else 0.0
    CPU_SHARE.leave()
    return result


def _rank_share(shares: list[dict]) -> dict:
    """This rank's progress in the checkpointed epoch: its own share when the checkpoint has one per rank;
    else (another world size, or an epoch boundary: one share) rank 0 carries all the running sums and the
    others none, so the epoch's totals stay right."""
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


def _preempted(device) -> bool:
    return not distributed.all_ranks(not preemption.requested(), device)


def _stopped(method: str, epoch: int, step: int, out_dir: Path) -> preemption.Preempted:
    message = (f"{method}: SIGTERM: stopped in epoch {epoch + 1} after step {step} with a "
               f"resumable checkpoint in {out_dir / LAST}; run the same command again to resume "
               f"(exit code {preemption.PREEMPTED_EXIT_CODE})")
    log.warning("%s", message)
    return preemption.Preempted(message)


_RESUME_ONLY = ("optimizer", "scheduler", "rng", "position", "progress")  # best.pt is for inference


def _train_step(model, step_model, batch, optimizer, scheduler, tcfg: TrainConfig, device) -> Optional[dict]:
    """One optimisation step; returns the loss parts, or None (and nothing updated) when the loss or the
    gradient norm is not finite."""
    # The forward itself moves BatchNorm's running statistics: a skipped step puts them back, or the bad
    # batch (NaN inputs included) would stay in the statistics evaluation uses.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    saved = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False)} for m in norms]

    def skip() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(buffers[k])

    per_term = tcfg.grad_clip > 0 and getattr(model, "auxiliary_loss", False)
    # One backward per term, and DDP's reducer allows one per forward: then the forward skips its hooks
    # and _backward_clipped averages each term's gradients over the ranks itself.
    ddp = per_term and hasattr(step_model, "no_sync")
    with step_model.no_sync() if ddp else contextlib.nullcontext(), autocast(device, tcfg.amp):
        losses = model.compute_loss(step_model(batch), batch)
    optimizer.zero_grad(set_to_none=True)
    values = {k: float(v.detach()) for k, v in losses.items()}
    # Under DDP all ranks skip together, or the others would wait forever in backward's all-reduce.
    if not distributed.all_ranks(math.isfinite(values["loss"]), device):
        skip()
        return None
    # Always take the norm (max_norm=inf when clipping is off: a multiply by exactly 1): a finite loss can
    # still give inf/NaN gradients, and one such update ruins every weight.
    norm = _backward_clipped(losses, model, tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf,
                             per_term, average=ddp)
    if not torch.isfinite(norm):
        skip()
        return None
    optimizer.step()
    scheduler.step()
    return values


def _backward_clipped(losses: dict, model, max_norm: float, per_term: bool, average: bool) -> torch.Tensor:
    """Backward of losses["loss"], gradients clipped to total norm `max_norm`; returns the norm (the sum of
    both terms' with per_term).

    per_term: the method's losses["auxiliary"] (what it adds over its ablation: distillation, erased copies,
    attention mining; already inside "loss") is clipped apart from the rest. One clip of the sum would let a
    large auxiliary gradient shrink the grounding loss's step too, so method and ablation would differ in
    step size as well as in the feature; clipped apart, the main term gets the ablation's exact gradient.
    Costs a second backward through the shared layers (only while clipping is on: without it the sum is
    already separable). `average`: the forward ran without DDP's hooks; each term's gradients are averaged
    over the ranks here, before its clip, as DDP would have."""
    params = [p for p in model.parameters() if p.requires_grad]
    aux = losses.get("auxiliary") if per_term else None
    if aux is None or not aux.requires_grad:
        losses["loss"].backward()
        if average:
            distributed.average_gradients(params)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    # d(loss - aux)/d(aux) is exactly 0: the auxiliary branch adds exact zeros to the main term's gradients.
    (losses["loss"] - aux).backward(retain_graph=True)
    if average:
        distributed.average_gradients(params)
    main_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    main = [p.grad for p in params]
    for p in params:
        p.grad = None
    aux.backward()
    if average:
        distributed.average_gradients(params)
    aux_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p, g in zip(params, main):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)
    return main_norm + aux_norm


def _count_bad_step(progress: _EpochProgress, result: TrainResult, batch: dict, epoch: int, tcfg: TrainConfig,
                    method: str, out_dir: Path, save_last: Callable) -> None:
    progress.skipped += 1
    progress.bad_in_a_row += 1
    result.skipped_steps += 1
    rows = batch["index"].tolist()
    log.warning("%s epoch %d step %d: loss or gradient not finite; step skipped (%d in a row, %d this run; "
                "batch rows %s)", method, epoch + 1, progress.step, progress.bad_in_a_row, result.skipped_steps,
                _short(rows))
    if progress.bad_in_a_row >= tcfg.max_bad_steps:
        save_last(epoch, progress)  # nothing was updated by the bad steps: this is the last good state
        raise NonFiniteLossError(
            f"{method}: the loss or gradient was not finite for {progress.bad_in_a_row} steps in a row "
            f"(train.max_bad_steps={tcfg.max_bad_steps}), the last at epoch {epoch + 1} step {progress.step} "
            f"(batch rows {_short(rows)}). "
            f"Stopped; the last good state is in {out_dir / LAST} (lower train.lr, or check those samples).")


def _short(rows: list[int], limit: int = 8) -> str:
    return str(rows[:limit])[:-1] + (", ...]" if len(rows) > limit else "]")


def _state(model, optimizer, scheduler, epoch, key, result, cfg, method, extra_state) -> dict:
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng_state(), "epoch": epoch, "run_key": key, "method": method,
        "config": cfg.model_dump(mode="json"), "history": result.history,
        "best_score": result.best_score, "best_epoch": result.best_epoch, **(extra_state or {}),
    }


def _maybe_resume(path: Path, key: str, model, optimizer, scheduler, sampler: ResumableShuffle,
                  result: TrainResult) -> tuple[int, _EpochProgress]:
    """(epoch to start, that epoch's progress so far)."""
    if not path.exists():
        return 0, _EpochProgress()
    try:
        state = load_checkpoint(path)
        if state.get("run_key") != key:
            log.warning("%s belongs to another run (config, method or code changed); starting from scratch", path)
            return 0, _EpochProgress()
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{path}: has the run's key but not {', '.join(missing)}")
    except CheckpointError as err:
        raise CheckpointError(f"{err}; cannot resume from it. Move it away to train from scratch.") from None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    sampler.restore(state["position"])  # the same batches, from the same place in the epoch
    result.history = list(state["history"])
    result.best_score, result.best_epoch = state["best_score"], state["best_epoch"]
    progress = _EpochProgress(**_rank_share(state.get("rank_progress") or [state["progress"]]))
    result.resumed_from_epoch, result.resumed_from_step = state["epoch"], progress.step
    result.skipped_steps = sum(h.get("train/skipped_steps", 0) for h in result.history) + progress.skipped
    log.info("resumed %s after %d epochs and %d steps", path, state["epoch"], result.resumed_from_step)
    return state["epoch"], progress
