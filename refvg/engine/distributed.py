"""Data-parallel training across processes (`torchrun`): process group from the launcher's
environment, rank helpers, the sampler that splits the data, and the reduction of per-rank sums.

Under `torchrun --nproc_per_node N` every process runs the same training script; `train.batch_size`
stays the *global* batch (each rank takes batch_size / N), so a run on N processes follows the same
optimisation as one process. Without the launcher's variables nothing here starts a process group
and the trainer runs exactly as it always did.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

# Rank 0 validates while the others wait for its result; a full validation pass must fit in this.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class DistributedError(RuntimeError):
    pass


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one rank of a group."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 without a launcher); usable before
    init."""
    return int(os.environ.get("RANK", "0"))


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group the launcher describes (idempotent) and return this rank's device: on
    CUDA one GPU per rank (`cuda:LOCAL_RANK`, NCCL), else the CPU with gloo. Without a launcher:
    `device`."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not is_active():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise DistributedError(
                "RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; "
                "launch with torchrun (e.g. torchrun --nproc_per_node 2 -m refvg.cli train ...)"
            )
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT
        )
        atexit.register(_teardown)
    return device


def _teardown() -> None:
    if is_active():
        dist.destroy_process_group()


def local_batch_size(global_batch: int) -> int:
    n = world_size()
    if global_batch % n:
        raise DistributedError(
            f"train.batch_size {global_batch} is the global batch and must divide evenly "
            f"over the {n} processes of this run"
        )
    return global_batch // n


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` (the model itself when not distributed). Gradients are
    averaged over ranks; parameters a forward leaves unused (a model may skip a part for some
    inputs) are tolerated. BatchNorm becomes SyncBatchNorm on CUDA, so its statistics are those of
    the global batch; on CPU (gloo) torch has no SyncBatchNorm and each rank normalises over its own
    share."""
    if not is_active():
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )


def sum_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-rank sums (loss x samples, sample counts) -> the sums over every rank."""
    if not is_active() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor(
        [float(values[k]) for k in keys],
        dtype=torch.float64,
        device=device if device.type == "cuda" else "cpu",
    )
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def average_gradients(params: list[torch.Tensor]) -> None:
    """Each parameter's .grad averaged over the ranks, as DDP's reducer does (for a backward run
    without it). A rank without a gradient for a parameter contributes zeros, as under
    find_unused_parameters."""
    if not is_active():
        return
    n = world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(n)


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on every rank (a decision every rank must take the same way)."""
    if not is_active():
        return flag
    t = torch.tensor([1 if flag else 0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather(obj) -> list:
    """`obj` of every rank, in rank order, on every rank ([obj] without a group)."""
    if not is_active():
        return [obj]
    objs = [None] * world_size()
    dist.all_gather_object(objs, obj)
    return objs


def from_main(obj):
    """`obj` as rank 0 has it, on every rank (e.g. the validation metrics only rank 0 computed)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
