"""DistributedDataParallel through the real launcher: `torchrun` with the gloo backend and 2 CPU processes
must train like 1 process with the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from refvg import stages
from refvg.config import load_config
from refvg.engine import distributed
from refvg.engine.checkpoint import load_checkpoint
from refvg.engine.trainer import LAST
from tests.conftest import ROOT, write_params

# Swin (LayerNorm only): torch has no SyncBatchNorm on CPU, so with a BatchNorm backbone each rank would
# normalise its half-batch on its own and the comparison could only be loose.
MODEL = {"visual": {"kind": "swin", "depths": [1, 1, 1], "embed_dim": 16, "num_heads": [1, 2, 4]},
         "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "vocab_size": 200},
         "fusion": {"d_model": 64, "num_layers": 1, "num_heads": 2, "ffn_dim": 128}}
TRAIN = {"epochs": 2, "batch_size": 16, "warmup_steps": 2}


def _params(workdir, tag: str):
    return write_params(workdir, model=MODEL, train={**TRAIN, "checkpoint_dir": f"ckpt_{tag}"},
                        methods={"transvg": {"model": "transvg"}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat(weights: dict) -> torch.Tensor:
    return torch.cat([v.float().flatten() for k, v in sorted(weights.items()) if v.is_floating_point()])


@pytest.mark.e2e
def test_two_gloo_processes_train_like_one_with_the_same_global_batch(in_tiny, monkeypatch):
    # Reference: one process, as torchrun --nproc_per_node 1 would start it, here in the test process.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank below: other thread counts sum in other orders, and Adam amplifies that
    try:
        stages.train_method(load_config(_params(in_tiny, "one")), "transvg")
        assert distributed.world_size() == 1 and distributed.is_active()
    finally:
        torch.set_num_threads(threads)
        torch.distributed.destroy_process_group()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key)
    one = load_checkpoint(in_tiny / "ckpt_one/transvg" / LAST)

    params = _params(in_tiny, "two")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "refvg.cli", "train", "--method", "transvg", "--params", str(params)],
        cwd=in_tiny, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    two = load_checkpoint(in_tiny / "ckpt_two/transvg" / LAST)

    assert [h["epoch"] for h in two["history"]] == [1, 2]
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        # Each epoch's loss is reduced over both ranks: the global mean, the number one process reports.
        # Measured: epoch 1 within 0.1 %, epoch 2 within 0.5 % (float summation order through AdamW, and the
        # ranks' batches padded to their own longest expression).
        assert h2["train/loss"] == pytest.approx(h1["train/loss"], rel=1e-2), (h1, h2)
    w1, w2 = _flat(one["model"]), _flat(two["model"])
    # Gradients summed in another order drift a little through AdamW; a rank training on the wrong share
    # of the data, or gradients summed instead of averaged, moves them by as much as training does.
    assert float((w1 - w2).norm() / w1.norm()) < 1e-2
    # Rank 0 alone logs and prints: one line per epoch and one result, not one per rank.
    assert out.count("transvg epoch 2/2") == 1 and out.count("best_val_acc@0.5") == 1, out[-3000:]
    print(f"2-process torchrun run: {time.perf_counter() - t0:.1f} s")


def test_global_batch_must_divide_over_the_ranks():
    assert distributed.local_batch_size(64) == 64  # one process: the whole batch
    from refvg.data.samplers import ResumableShuffle

    # Two ranks' shares of one epoch: disjoint, together the single process's order cut to an even length.
    one, r0, r1 = (list(ResumableShuffle(9, seed=3, rank=r, world=w)) for r, w in ((0, 1), (0, 2), (1, 2)))
    assert r0 == one[0:8:2] and r1 == one[1:8:2] and len(ResumableShuffle(9, 3, rank=1, world=2)) == 4
