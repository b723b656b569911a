"""The training loop, in one place: AdamW, warmup + cosine/step schedule, grad clipping, bf16 autocast on
CUDA, per-epoch validation, atomic checkpoints with optimizer/scheduler/RNG state, and resume. Under
`torchrun` the same loop runs data-parallel (refvg.engine.distributed).

Tracking stays outside: the caller passes `on_epoch_end(metrics, epoch)` (the flows hook MLflow there), so
this module runs the same under a test, a notebook, DVC, Prefect or torchrun.
"""
from __future__ import annotations

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
from refvg.engine import distributed
from refvg.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from refvg.engine.runtime import autocast, resolve_device, seed_everything, to_device

log = logging.getLogger(__name__)
LAST, BEST = "last.pt", "best.pt"


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = -1
    checkpoint_dir: Optional[Path] = None
    samples_per_second: float = 0.0
    compute_seconds: float = 0.0  # forward/backward/step and validation: the work, not the orchestration
    resumed_from_epoch: int = 0

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


def run_key(cfg: Config, method: str) -> str:
    """Identifies what a checkpoint was trained for; resume only continues a run with the same key."""
    blob = json.dumps({"method": method, "cfg": cfg.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
) -> TrainResult:
    """Train `model` on `train_set` for `cfg.train.epochs`; `evaluate(model)` scores it after each epoch and
    the best epoch by `select_metric` is kept as best.pt. Resumes from out_dir/last.pt when it belongs to the
    same run (same method and config)."""
    tcfg = cfg.train
    out_dir = Path(out_dir)
    device = distributed.setup(resolve_device(tcfg.device))  # under torchrun: join the group, this rank's GPU
    main = distributed.is_main()  # only rank 0 logs, validates and writes checkpoints
    seed_everything(tcfg.seed)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    step_model = distributed.wrap(model, device)
    step_model = torch.compile(step_model) if tcfg.compile else step_model

    drop_last = len(train_set) > tcfg.batch_size
    sampler = distributed.sampler(train_set, tcfg.seed, drop_last)
    loader = DataLoader(
        train_set, batch_size=distributed.local_batch_size(tcfg.batch_size), shuffle=sampler is None,
        sampler=sampler, drop_last=drop_last,
        collate_fn=collate, num_workers=tcfg.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=tcfg.num_workers > 0, generator=torch.Generator().manual_seed(tcfg.seed),
    )
    total_steps = tcfg.epochs * len(loader)
    optimizer = build_optimizer(model, tcfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
    key = run_key(cfg, method)
    result = TrainResult(checkpoint_dir=out_dir)
    start_epoch = _maybe_resume(out_dir / LAST, key, model, optimizer, scheduler, loader, result)

    for epoch in range(start_epoch, tcfg.epochs):
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0, seen, loss_sum, parts_sum = time.perf_counter(), 0, 0.0, {}
        # disable=None: a live bar on a terminal, nothing in logs (the per-epoch line below is logged anyway)
        bar = tqdm(loader, desc=f"{method} epoch {epoch + 1}/{tcfg.epochs}", leave=False, dynamic_ncols=True,
                   disable=None if main else True, mininterval=1.0)
        for batch in bar:
            batch = to_device(batch, device)
            with autocast(device, tcfg.amp):
                losses = model.compute_loss(step_model(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            scheduler.step()
            n = batch["image"].shape[0]  # weakly supervised batches carry no box
            seen += n
            loss_sum += losses["loss"].item() * n
            for k, v in losses.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) * n
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", sps=f"{seen / (time.perf_counter() - t0):.0f}")
        totals = distributed.sum_over_ranks({"seen": seen, **parts_sum}, device)
        seen, parts_sum = totals.pop("seen"), totals
        train_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        val = distributed.from_main(evaluate(model) if main else None)
        val_seconds = time.perf_counter() - t1
        result.compute_seconds += train_seconds + val_seconds
        metrics = {f"train/{k}": v / max(seen, 1) for k, v in parts_sum.items()}
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
        if not main:
            continue
        state = _state(model, optimizer, scheduler, epoch + 1, key, result, cfg, method, extra_state)
        state["loader_rng"] = loader.generator.get_state()
        if is_best:
            save_checkpoint({k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "rng")}, out_dir / BEST)
        save_checkpoint(state, out_dir / LAST)
        log.info("%s epoch %d/%d loss %.4f val %s=%.4f (%.0f samples/s)", method, epoch + 1, tcfg.epochs,
                 metrics.get("train/loss", float("nan")), select_metric, score, metrics["samples_per_second"])
        on_epoch_end(metrics, epoch + 1)

    trained = [h["samples_per_second"] for h in result.history[result.resumed_from_epoch:]]
    result.samples_per_second = sum(trained) / len(trained) if trained else 0.0
    return result


def _state(model, optimizer, scheduler, epoch, key, result, cfg, method, extra_state) -> dict:
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng_state(), "epoch": epoch, "run_key": key, "method": method,
        "config": cfg.model_dump(mode="json"), "history": result.history,
        "best_score": result.best_score, "best_epoch": result.best_epoch, **(extra_state or {}),
    }


def _maybe_resume(path: Path, key: str, model, optimizer, scheduler, loader, result: TrainResult) -> int:
    if not path.exists():
        return 0
    state = load_checkpoint(path)
    if state.get("run_key") != key:
        log.warning("%s belongs to another run (config or method changed); starting from scratch", path)
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    # The shuffle generator must continue where it was, or a resumed run sees other batches.
    loader.generator.set_state(state["loader_rng"])
    result.history = list(state["history"])
    result.best_score, result.best_epoch = state["best_score"], state["best_epoch"]
    result.resumed_from_epoch = state["epoch"]
    log.info("resumed %s at epoch %d", path, state["epoch"])
    return state["epoch"]
