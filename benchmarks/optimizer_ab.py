"""AdamW per-tensor loop vs fused, on a whole training step, A/B in one process.

    python benchmarks/optimizer_ab.py [--models qrnet transvg] [--batch 64] [--pairs 5]

Two identical copies of each model, one with AdamW(fused=False) (what refvg uses on CPU), one with
AdamW(fused=True) (what it uses on CUDA); their training steps (forward + backward + AdamW, as
benchmarks/train_step.py times them) alternate A, B, A, B, ... so a shared, busy machine's load
falls on both alike. Prints the median step time of each, the ratio, and each arm's FLOP/s over a
fp32 matmul peak measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import matmul_peak_flops, model_config, step_flops, synthetic_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=["qrnet", "transvg"])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=5, help="timed A/B pairs after one warm-up pair")
    args = ap.parse_args()

    import torch

    from refvg.engine.runtime import seed_everything, to_device
    from refvg.models import build_model

    device = torch.device("cpu")
    print(
        f"train step, {args.image_size}x{args.image_size}, batch {args.batch}, "
        f"{torch.get_num_threads()} threads; median of {args.pairs} alternating steps per arm"
    )
    print(
        f"{'model':<9}{'arm':<16}{'s/step':>8}{'samples/s':>11}{'GFLOP/s':>9}{'peak GFLOP/s':>14}"
        f"{'% of peak':>11}"
    )
    for name in args.models:
        cfg = model_config(name, args.image_size, False)
        seed_everything(0)
        base = build_model(name, cfg, vocab_size=cfg.model.text.vocab_size, pad_token_id=0).train()
        data = to_device(synthetic_batch(cfg, args.batch), device)
        arms = {}
        for fused in (False, True):
            model = copy.deepcopy(base)
            groups = model.param_groups(cfg.train.lr, cfg.train.lr_backbone, cfg.train.weight_decay)
            arms[fused] = (model, torch.optim.AdamW(groups, lr=cfg.train.lr, fused=fused))

        def step(arm):
            model, opt = arm
            loss = model.compute_loss(model(data), data)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        times = {False: [], True: []}
        for i in range(args.pairs + 1):
            for fused in (False, True) if i % 2 == 0 else (True, False):  # ABBA: no order bias
                t0 = time.perf_counter()
                step(arms[fused])
                if i:  # the first pair warms up
                    times[fused].append(time.perf_counter() - t0)
        model = arms[False][0]

        def forward_backward():
            model.compute_loss(model(data), data)["loss"].backward()

        flops = step_flops(forward_backward)
        peak = matmul_peak_flops(device)
        for fused, label in ((False, "AdamW loop"), (True, "AdamW fused")):
            s = statistics.median(times[fused])
            print(
                f"{name:<9}{label:<16}{s:>8.2f}{args.batch / s:>11.1f}{flops / s / 1e9:>9.2f}"
                f"{peak / 1e9:>14.1f}{100 * flops / s / peak:>10.1f}%"
            )
        ratio = statistics.median(times[False]) / statistics.median(times[True])
        print(f"{name:<9}fused / loop: {ratio:.2f}x samples/s")


if __name__ == "__main__":
    main()
