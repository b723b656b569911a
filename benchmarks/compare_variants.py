"""Val Acc@0.5 of TransVG / QRNet variants, each pair trained for equal epochs from one seed.

    PYTHONPATH=$PWD python benchmarks/compare_variants.py [--pairs transvg qrnet_qdatt]
        [--transvg-epochs 3] [--qrnet-epochs 2] [--seeds 0] [--variants NAME ...]
        [--params params.yaml] [--json out.json]

Pairs (the first of each is the params.yaml default):
  transvg        transvg (the paper's) vs transvg_attn (refvg's earlier variant)
  qrnet_qdatt    qrnet vs qrnet_no_qdatt (QD-ATT off)
  transvg_parts  the paper's TransVG vs itself with one of transvg_attn's differences each
Methods come from params.yaml's `transvg` and `qrnet` entries plus the overrides below, so the
figures follow params.yaml. Needs the prepared data (`python -m flows.generate`, then
`-m flows.prepare`). Every run trains into a fresh temporary checkpoint folder (nothing resumes,
nothing in checkpoints/ changes). Prints val Acc@0.5 after every epoch and the training seconds
(timings on a shared machine: compare ratios within one run only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTN = {
    "model": {
        "fusion": {
            "visual_encoder_layers": 0,
            "position": "tokens",
            "cell_coords": True,
            "box_head": "attention",
        }
    },
    "config": {"l1_weight": 5.0, "giou_weight": 2.0},
}
# name -> (params.yaml method it starts from, extra overrides; "config": the family's knobs)
VARIANTS = {
    "transvg": ("transvg", {}),
    "transvg_attn": ("transvg", ATTN),
    # The paper's TransVG with one of transvg_attn's differences each: which one decides learning
    # here.
    "transvg_attention_head": ("transvg", {"model": {"fusion": {"box_head": "attention"}}}),
    "transvg_tokens": ("transvg", {"model": {"fusion": {"position": "tokens"}}}),
    "transvg_cell_coords": ("transvg", {"model": {"fusion": {"cell_coords": True}}}),
    "transvg_no_encoder": ("transvg", {"model": {"fusion": {"visual_encoder_layers": 0}}}),
    "transvg_paper_lr": ("transvg", {"train": {"lr": 1e-4, "lr_backbone": 1e-4}}),
    "qrnet": ("qrnet", {}),
    "qrnet_no_qdatt": ("qrnet", {"config": {"qd_att": False}}),
}
PAIRS = {
    "transvg": ("transvg", "transvg_attn"),
    "qrnet_qdatt": ("qrnet", "qrnet_no_qdatt"),
    "transvg_parts": (
        "transvg",
        "transvg_attention_head",
        "transvg_tokens",
        "transvg_cell_coords",
        "transvg_no_encoder",
        "transvg_paper_lr",
    ),
}


def run_config(cfg, name: str, epochs: int, seed: int, out_dir: str):
    """The Config for variant `name` as a one-method table, with its epochs, seed and checkpoint
    folder."""
    from refvg.config import Config, _deep_merge

    base, extra = VARIANTS[name]
    method = cfg.all_methods[base].model_dump(mode="python")
    config = _deep_merge(method["config"], extra.get("config", {}))
    overrides = _deep_merge(method["overrides"], {k: v for k, v in extra.items() if k != "config"})
    overrides = _deep_merge(overrides, {"train": {"epochs": epochs, "seed": seed}})
    raw = cfg.model_dump(mode="python")
    raw["train"]["checkpoint_dir"] = out_dir  # the top-level one names the method's checkpoints
    raw["methods"] = {name: {**method, "config": config, "overrides": overrides}}
    raw["distill_methods"] = {}
    return Config.model_validate(raw)


def train_one(cfg, name: str, epochs: int, seed: int) -> dict:
    from refvg.stages import train_method

    curve: list[float] = []
    with tempfile.TemporaryDirectory(prefix=f"compare-{name}-") as tmp:
        rcfg = run_config(cfg, name, epochs, seed, tmp)
        t0 = time.perf_counter()

        def on_epoch_end(metrics: dict, epoch: int) -> None:
            curve.append(float(metrics["val/acc@0.5"]))
            print(
                f"  {name} seed {seed} epoch {epoch}/{epochs}: val Acc@0.5 {curve[-1]:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

        train_method(rcfg, name, on_epoch_end=on_epoch_end)
        seconds = time.perf_counter() - t0
    return {
        "variant": name,
        "seed": seed,
        "epochs": epochs,
        "val_acc@0.5": curve,
        "seconds": round(seconds, 1),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=list(PAIRS))
    p.add_argument("--transvg-epochs", type=int, default=3)
    p.add_argument("--qrnet-epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        help="train only these variants of the pairs (one per process, say); default: all",
    )
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)

    from refvg.config import load_config
    from refvg.tracking import disable_telemetry

    disable_telemetry()
    cfg = load_config(args.params)
    rows, done = [], {}
    for pair in args.pairs:
        epochs = args.qrnet_epochs if pair == "qrnet_qdatt" else args.transvg_epochs
        for seed in args.seeds:
            for name in PAIRS[pair]:
                if args.variants and name not in args.variants:
                    continue
                if (name, epochs, seed) not in done:  # a variant in several pairs trains once
                    done[name, epochs, seed] = train_one(cfg, name, epochs, seed)
                row = done[name, epochs, seed]
                rows.append({"pair": pair, **row})
                curve = " ".join(f"{a:.3f}" for a in row["val_acc@0.5"])
                print(
                    f"{pair:13s} {name:15s} seed {seed} epochs {epochs}: val Acc@0.5 per epoch "
                    f"{curve} ({row['seconds']:.0f} s)",
                    flush=True,
                )
    print("\n| pair | variant | seeds | epochs | val Acc@0.5 (last epoch, mean) | train s (mean) |")
    print("|---|---|---|---|---|---|")
    for pair in args.pairs:
        for name in PAIRS[pair]:
            mine = [r for r in rows if r["pair"] == pair and r["variant"] == name]
            if not mine:
                continue
            acc = sum(r["val_acc@0.5"][-1] for r in mine) / len(mine)
            sec = sum(r["seconds"] for r in mine) / len(mine)
            epochs = mine[0]["epochs"]
            print(f"| {pair} | {name} | {len(mine)} | {epochs} | {acc:.3f} | {sec:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
