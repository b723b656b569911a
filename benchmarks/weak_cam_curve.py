"""The weak_cam matcher's loss curve: trains a params.yaml method (weak_cam_no_mining by
default) with the trainer's optimizer and schedule on one thread and prints the mean of each loss
over every 25 steps (itm: the fusion matcher's BCE, ln 2 = 0.693 is chance) and val Acc@0.5 of the
weights after each epoch (the boxes are read here only to print it, nothing is selected on it). The
scratch runs of docs/weak_cam.md, e.g. the old objective at 1 epoch and today's:

    PYTHONPATH=$PWD nice -n 10 python benchmarks/weak_cam_curve.py --set '{"method": {"config":
        {"negatives": "hard", "itc_weight": 1.0, "match_fraction": 0.125}}, "train": {"epochs": 1}}'
    PYTHONPATH=$PWD nice -n 10 python benchmarks/weak_cam_curve.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from refvg import stages  # noqa: E402
from refvg.config import Config, _deep_merge, load_config  # noqa: E402
from refvg.data.dataset import collate, read_manifest  # noqa: E402
from refvg.data.prepare import prepared_path  # noqa: E402
from refvg.engine.evaluator import box_metrics, predict_split  # noqa: E402
from refvg.engine.runtime import seed_everything, to_device  # noqa: E402
from refvg.engine.trainer import build_optimizer, lr_lambda  # noqa: E402
from refvg.models import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="weak_cam_no_mining")
    ap.add_argument("--set", default="{}", help="JSON merged into the method's run config")
    ap.add_argument("--every", type=int, default=25)
    args = ap.parse_args()
    base = load_config("params.yaml").for_method(args.method)
    cfg = Config.model_validate(_deep_merge(base.model_dump(mode="python"), json.loads(args.set)))
    tc, cpu = cfg.train, torch.device("cpu")
    torch.set_num_threads(1)
    manifest = read_manifest(prepared_path(cfg))
    pairs = stages.open_split(cfg, "weak_cam", "train", training=True)
    val = stages.open_split(cfg, "weak_cam", "val")
    seed_everything(tc.seed)
    model = build_model("weak_cam", cfg, manifest["vocab_size"], manifest["pad_token_id"])
    loader = DataLoader(
        pairs,
        batch_size=tc.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(tc.seed),
    )
    steps = tc.epochs * len(loader)
    opt = build_optimizer(model, tc, cpu)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc, steps))
    t0, sums, n, step = time.time(), {}, 0, 0
    for epoch in range(tc.epochs):
        model.train()
        for batch in loader:
            batch = to_device(batch, cpu)
            losses = model.compute_loss(model(batch), batch)
            opt.zero_grad()
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n, step = n + 1, step + 1
            if n == args.every or step == steps:
                parts = " ".join(f"{k}={v / n:.3f}" for k, v in sums.items())
                print(f"step {step} {parts} {time.time() - t0:.0f}s", flush=True)
                sums, n = {}, 0
        acc = box_metrics(predict_split(model, val, 64, cpu), [0.5])["acc@0.5"]
        print(f"epoch {epoch + 1} val acc@0.5 {acc:.3f} {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
