"""Where one training step's CPU time goes: torch.profiler over one forward + backward + AdamW step of a
box model at the default pipeline size, after one warm-up step, ops sorted by self CPU time.

    python benchmarks/profile_step.py [--model qrnet] [--batch 64] [--rows 25]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import model_config, synthetic_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qrnet")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from refvg.engine.runtime import seed_everything, to_device
    from refvg.engine.trainer import build_optimizer
    from refvg.models import build_model

    device = torch.device("cpu")
    cfg = model_config(args.model, args.image_size, False)
    seed_everything(0)
    model = build_model(args.model, cfg, vocab_size=cfg.model.text.vocab_size, pad_token_id=0).train()
    opt = build_optimizer(model, cfg.train, device)
    data = to_device(synthetic_batch(cfg, args.batch), device)

    def step():
        loss = model.compute_loss(model(data), data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                    max_name_column_width=45))


if __name__ == "__main__":
    main()
