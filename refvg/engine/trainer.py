"""The training loop, in one place: AdamW, warmup + cosine/step schedule, grad clipping, bf16
autocast on CUDA, the non-finite step skip. Everything else a run does is a hook
(refvg.engine.hooks): resume and atomic checkpoints with optimizer/scheduler/RNG state, per-epoch
validation and best.pt, the per-epoch report, preemption. Under `torchrun` the same loop runs
data-parallel (refvg.engine.distributed).

Crash safety: last.pt is written at every epoch end and every `train.checkpoint_every_steps` steps,
with everything that decides the rest of the run (weights, optimizer, schedule, RNG states, the
position in the epoch's data order, the epoch's running sums), so a run killed at any point and
started again ends bitwise where the uninterrupted run ends (on CPU). A step whose loss or gradient
norm is not finite is skipped (no update) and counted; `train.max_bad_steps` of them in a row stop
the run with the last good state saved. SIGTERM (preemption) stops the run at the next step boundary
with last.pt written and exit code 143 (refvg.engine.preemption).

Tracking stays outside: the caller passes `on_epoch_end(metrics, epoch)` (the flows hook MLflow
there), so this module runs the same under a test, a notebook, DVC, Prefect or torchrun.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from refvg.config import Config, TrainConfig
from refvg.data.dataset import collate
from refvg.data.samplers import ResumableShuffle
from refvg.engine import distributed, preemption
from refvg.engine.hooks import (  # noqa: F401  (BEST, LAST, NonFiniteLossError: part of this module's interface)
    BEST,
    LAST,
    Checkpointer,
    EpochProgress,
    EpochReport,
    LoopState,
    NonFiniteGuard,
    NonFiniteLossError,
    Preemption,
    TrainResult,
    Validation,
)
from refvg.engine.fingerprint import RESUME_NEUTRAL, run_code_digest
from refvg.engine.runtime import CPU_SHARE, autocast, resolve_device, seed_everything, to_device

log = logging.getLogger(__name__)


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


def build_optimizer(
    model: torch.nn.Module, tcfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    groups = model.param_groups(tcfg.lr, tcfg.lr_backbone, tcfg.weight_decay)
    return torch.optim.AdamW(groups, lr=tcfg.lr, fused=device.type == "cuda")


def run_key(cfg: Config, method: str, data_version: str = "") -> str:
    """Identifies what a checkpoint was trained for (method, config, the library code its training
    runs, data); resume only continues a run with the same key. Code and data are part of it because
    DVC keeps the checkpoint folder between runs: a changed model or dataset must not pick up
    weights trained on the old one. Knobs in RESUME_NEUTRAL do not change what a run computes, so
    they do not throw its progress away."""
    dumped = cfg.model_dump(mode="json")
    for section, keys in RESUME_NEUTRAL.items():
        if keys is None:
            dumped.pop(section, None)
        else:
            for k in keys:
                dumped[section].pop(k, None)
    blob = json.dumps(
        {
            "method": method,
            "cfg": dumped,
            "code": run_code_digest(cfg, method),
            "data": data_version,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    """Train `model` (a module with compute_loss(outputs, batch) and param_groups(lr, lr_backbone,
    weight_decay)) on `train_set` for `cfg.train.epochs`; `evaluate(model)` scores it after each
    epoch and the best epoch by `select_metric` is kept as best.pt. Resumes from out_dir/last.pt
    when it belongs to the same run (same method, config, code and `data_version`), mid-epoch
    included. `on_epoch_end(metrics, epoch)` is called after each epoch and, on resume, once for
    each epoch restored from the checkpoint, so a tracker attached to the new process still gets the
    whole history."""
    tcfg = cfg.train
    device = distributed.setup(
        resolve_device(tcfg.device)
    )  # under torchrun: join the group, this rank's GPU
    seed_everything(tcfg.seed)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    step_model = distributed.wrap(model, device)
    step_model = torch.compile(step_model) if tcfg.compile else step_model

    # Every rank draws the same order and takes its interleaved share (rank::world): the ranks' k-th
    # batches together are the k-th global batch of one process with train.batch_size.
    sampler = ResumableShuffle(
        len(train_set), tcfg.seed, rank=distributed.rank(), world=distributed.world_size()
    )
    local_batch = distributed.local_batch_size(tcfg.batch_size)
    loader = DataLoader(
        train_set,
        batch_size=local_batch,
        sampler=sampler,
        drop_last=len(train_set) > tcfg.batch_size,
        collate_fn=collate,
        num_workers=tcfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=tcfg.num_workers > 0,
        generator=torch.Generator().manual_seed(tcfg.seed),
    )
    optimizer = build_optimizer(model, tcfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tcfg, tcfg.epochs * len(loader))
    )
    state = LoopState(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        cfg=cfg,
        method=method,
        out_dir=Path(out_dir),
        run_key=run_key(cfg, method, data_version),
        device=device,
        local_batch=local_batch,
        steps_per_epoch=len(loader),
        result=TrainResult(checkpoint_dir=Path(out_dir), select_metric=select_metric),
        extra_state=extra_state or {},
        main=distributed.is_main(),
    )
    # In this order (refvg.engine.hooks says why)
    hooks = [
        NonFiniteGuard(tcfg.max_bad_steps),
        Validation(evaluate, select_metric),
        Checkpointer(tcfg.checkpoint_every_steps),
        EpochReport(on_epoch_end, select_metric),
        Preemption(),
    ]
    result = state.result

    CPU_SHARE.enter()  # its share of the cores while other trainings run beside it
    try:
        for hook in hooks:
            hook.before_train(
                state
            )  # resume (state.epoch, state.progress), then replay the history
        for epoch in range(state.epoch, tcfg.epochs):
            state.epoch = epoch
            model.train()
            progress, t0 = state.progress, time.perf_counter()
            # disable=None: a live bar on a terminal, nothing in logs (the per-epoch line is logged
            # anyway)
            bar = tqdm(
                loader,
                desc=f"{method} epoch {epoch + 1}/{tcfg.epochs}",
                leave=False,
                dynamic_ncols=True,
                disable=None if state.main else True,
                mininterval=1.0,
            )
            for batch in bar:
                progress.step += 1
                CPU_SHARE.refresh()
                state.batch = batch
                state.losses = _train_step(
                    model, step_model, to_device(batch, device), optimizer, scheduler, tcfg, device
                )  # None: skipped, nothing updated
                if state.losses is not None:
                    n = batch["image"].shape[0]  # weakly supervised batches carry no box
                    progress.seen += n
                    progress.loss_sum += state.losses["loss"] * n
                    for k, v in state.losses.items():
                        progress.parts_sum[k] = progress.parts_sum.get(k, 0.0) + v * n
                    bar.set_postfix(
                        loss=f"{progress.loss_sum / max(progress.seen, 1):.4f}",
                        sps=f"{progress.seen / (time.perf_counter() - t0):.0f}",
                    )
                for hook in hooks:
                    hook.after_step(state)

            totals = distributed.sum_over_ranks(
                {"seen": progress.seen, **progress.parts_sum}, device
            )
            seen, seconds = totals.pop("seen"), time.perf_counter() - t0
            result.compute_seconds += seconds
            state.metrics = {f"train/{k}": v / max(seen, 1) for k, v in totals.items()}
            state.metrics |= {
                "train/skipped_steps": progress.skipped,
                "lr": scheduler.get_last_lr()[0],
                "samples_per_second": seen / seconds,
                "epoch_seconds": seconds,
            }
            state.progress = EpochProgress(
                bad_in_a_row=progress.bad_in_a_row
            )  # "in a row" spans epochs
            for hook in hooks:
                hook.after_epoch(state)  # validation + best, checkpoints, report
        for hook in hooks:
            hook.after_train(state)
    finally:
        CPU_SHARE.leave()

    trained = [h["samples_per_second"] for h in result.history[result.resumed_from_epoch :]]
    result.samples_per_second = sum(trained) / len(trained) if trained else 0.0
    return result


def _train_step(
    model, step_model, batch, optimizer, scheduler, tcfg: TrainConfig, device
) -> Optional[dict]:
    """One optimisation step; returns the loss parts, or None (and nothing updated) when the loss or
    the gradient norm is not finite."""
    # The forward itself moves BatchNorm's running statistics: a skipped step puts them back, or the
    # bad batch (NaN inputs included) would stay in the statistics evaluation uses.
    norms = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
    ]
    saved = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False)} for m in norms]

    def skip() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(buffers[k])

    per_term = tcfg.grad_clip > 0 and model.auxiliary_loss
    # One backward per term, and DDP's reducer allows one per forward: then the forward skips its
    # hooks and _backward_clipped averages each term's gradients over the ranks itself.
    ddp = per_term and hasattr(step_model, "no_sync")
    with step_model.no_sync() if ddp else contextlib.nullcontext(), autocast(device, tcfg.amp):
        losses = model.compute_loss(step_model(batch), batch)
    optimizer.zero_grad(set_to_none=True)
    values = {k: float(v.detach()) for k, v in losses.items()}
    # Under DDP all ranks skip together, or the others would wait forever in backward's all-reduce.
    if not distributed.all_ranks(math.isfinite(values["loss"]), device):
        skip()
        return None
    # Always take the norm (max_norm=inf when clipping is off: a multiply by exactly 1): a finite
    # loss can still give inf/NaN gradients, and one such update ruins every weight.
    norm = _backward_clipped(
        losses, model, tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf, per_term, average=ddp
    )
    if not torch.isfinite(norm):
        skip()
        return None
    optimizer.step()
    scheduler.step()
    return values


def _backward_clipped(
    losses: dict, model, max_norm: float, per_term: bool, average: bool
) -> torch.Tensor:
    """Backward of losses["loss"], gradients clipped to total norm `max_norm`; returns the norm (the
    sum of both terms' with per_term).

    per_term: the method's losses["auxiliary"] (what it adds over its ablation: distillation, erased
    copies, attention mining; already inside "loss") is clipped apart from the rest. One clip of the
    sum would let a large auxiliary gradient shrink the grounding loss's step too, so method and
    ablation would differ in step size as well as in the feature; clipped apart, the main term gets
    the ablation's exact gradient. Costs a second backward through the shared layers (only while
    clipping is on: without it the sum is already separable). `average`: the forward ran without
    DDP's hooks; each term's gradients are averaged over the ranks here, before its clip, as DDP
    would have."""
    params = [p for p in model.parameters() if p.requires_grad]
    aux = losses.get("auxiliary") if per_term else None
    if aux is None or not aux.requires_grad:
        losses["loss"].backward()
        if average:
            distributed.average_gradients(params)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    # d(loss - aux)/d(aux) is exactly 0: the auxiliary branch adds exact zeros to the main term's
    # gradients.
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
