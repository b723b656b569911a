"""Paired comparisons: each method against its ablation or control, on the same data, budget and
seeds.

    python benchmarks/compare.py                         # every pair params.yaml declares, 3 seeds
    python benchmarks/compare.py --seeds 5 --pairs "qrnet vs qrnet_no_qdatt"
    python benchmarks/compare.py --work /tmp/cmp --keep  # keep every run's checkpoints and metrics

Run it in the repository after `dvc repro` (it reuses the prepared data, the detections file and the
teacher; what is missing it makes first). For each seed s both methods of a pair train with
`train.seed = s` (initial weights, data order) for the epochs params.yaml gives them (a pair whose
budgets differ is refused: such a difference is not the feature's), and are scored on every prepared
split but train. Per pair and split it records the per-seed accuracies, their means and standard
deviations, the mean paired difference a - b and its 95 % t-interval; the verdict is "a better" / "b
better" when the interval excludes 0, else "inside noise". Writes benchmarks/pairs.json and
benchmarks/pairs.md (the README's table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (a, b): a is the method with the feature, b its ablation or control.
PAIRS = [
    ("transvg", "transvg_blind"),
    ("transvg", "transvg_attn"),
    ("qrnet", "qrnet_no_qdatt"),
    ("mattnet_erase", "mattnet_no_erase"),
    ("mattnet_erase_det", "mattnet_no_erase_det"),
    ("weak_cam", "weak_cam_no_mining"),
    ("epmvg", "epmvg_no_distill"),
]


def paired_interval(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """Mean of a - b over paired runs and its two-sided t-interval (needs at least 2 pairs)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half, "sd_diff": sd}


def _sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


def verdict(rec: dict) -> str:
    if not (rec["ci_low"] == rec["ci_low"]):  # nan: one seed
        return "one seed"
    return "a better" if rec["ci_low"] > 0 else "b better" if rec["ci_high"] < 0 else "inside noise"


def _shared_inputs(cfg, base: Path, work: Path) -> None:
    """The prepared data, detections and teacher the runs share: those of the params file's folder,
    made here if missing."""
    from refvg import stages

    work.mkdir(parents=True, exist_ok=True)
    for name in ("data", Path(cfg.teacher.out_dir).parts[0]):
        src = base / name
        if src.exists() and not (work / name).exists():
            (work / name).symlink_to(src)
    os.chdir(work)
    if not (Path(cfg.data.prepared_dir) / cfg.data.dataset / "manifest.json").exists():
        if cfg.data.dataset == "refshapes":
            stages.generate(cfg)
        stages.prepare(cfg)
    if not (Path(cfg.detections.dir) / "methods").exists():
        stages.detections(cfg)
    if cfg.distill_methods and not (Path(cfg.teacher.out_dir) / "features").exists():
        stages.teacher(cfg)


def run_method(raw: dict, method: str, seed: int, work: Path, keep: bool) -> dict:
    """Train and evaluate `method` with train.seed = seed in its own folder; returns its metrics
    JSON."""
    from refvg import stages
    from refvg.config import _validate

    raw = json.loads(json.dumps(raw))
    table = "methods" if method in raw.get("methods", {}) else "distill_methods"
    entry = raw[table][method]
    entry.setdefault("overrides", {}).setdefault("train", {})["seed"] = seed
    run_dir = work / f"seed{seed}"
    raw["train"]["checkpoint_dir"] = str(run_dir / "checkpoints")
    raw["eval"]["metrics_dir"] = str(run_dir / "metrics")
    raw["eval"]["plots_dir"] = str(run_dir / "plots")
    cfg = _validate(raw, source=f"{method} seed {seed}")
    t0 = time.perf_counter()
    stages.train_method(cfg, method)
    stages.evaluate_method(cfg, method)
    metrics = json.loads((run_dir / "metrics" / f"{method}.json").read_text())
    if not keep:
        shutil.rmtree(run_dir / "checkpoints" / method, ignore_errors=True)
    print(
        f"  {method} seed {seed}: "
        + ", ".join(f"{s} {m['acc@0.5']:.3f}" for s, m in metrics["splits"].items())
        + f" ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return metrics


def compare(
    params: Path, pairs: list[tuple[str, str]], seeds: list[int], work: Path, keep: bool
) -> list[dict]:
    from refvg.config import load_config

    cfg = load_config(params)
    raw = yaml.safe_load(params.read_text())
    declared = cfg.all_methods
    pairs = [(a, b) for a, b in pairs if a in declared and b in declared]
    for a, b in pairs:
        ea, eb = cfg.for_method(a).train.epochs, cfg.for_method(b).train.epochs
        if ea != eb:
            raise SystemExit(
                f"{a} trains {ea} epochs and {b} {eb}: a paired comparison needs equal budgets"
            )
    _shared_inputs(cfg, params.parent, work)
    runs: dict[tuple[str, int], dict] = {}
    for a, b in pairs:
        print(f"{a} vs {b}", flush=True)
        for seed in seeds:
            for m in (a, b):
                if (m, seed) not in runs:
                    runs[(m, seed)] = run_method(raw, m, seed, work, keep)
    records = []
    for a, b in pairs:
        splits = [s for s in runs[(a, seeds[0])]["splits"] if s in runs[(b, seeds[0])]["splits"]]
        for split in splits:
            xa = [runs[(a, s)]["splits"][split]["acc@0.5"] for s in seeds]
            xb = [runs[(b, s)]["splits"][split]["acc@0.5"] for s in seeds]
            rec = {
                "pair": f"{a} vs {b}",
                "split": split,
                "seeds": len(seeds),
                "epochs": cfg.for_method(a).train.epochs,
                "a": xa,
                "b": xb,
                "a_mean": sum(xa) / len(xa),
                "b_mean": sum(xb) / len(xb),
                "a_sd": _sd(xa),
                "b_sd": _sd(xb),
                **paired_interval(xa, xb),
            }
            rec["verdict"] = verdict(rec)
            records.append(rec)
    return records


def markdown(records: list[dict]) -> str:
    lines = [
        "| pair (a vs b) | split | epochs | seeds | a | b | a - b [95 % CI] | verdict |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['pair']} | {r['split']} | {r['epochs']} | {r['seeds']} "
            f"| {r['a_mean']:.3f} ± {r['a_sd']:.3f} "
            f"| {r['b_mean']:.3f} ± {r['b_sd']:.3f} | {r['mean_diff']:+.3f} [{r['ci_low']:+.3f}, "
            f"{r['ci_high']:+.3f}] | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument(
        "--pairs", nargs="*", help='e.g. "qrnet vs qrnet_no_qdatt" (default: every declared pair)'
    )
    p.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "pairs.json")
    args = p.parse_args()
    pairs = [tuple(x.split(" vs ")) for x in args.pairs] if args.pairs else PAIRS
    work = args.work or Path(tempfile.mkdtemp(prefix="refvg-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = compare(
        args.params.resolve(), pairs, list(range(args.seeds)), work.resolve(), args.keep
    )
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(records))
    print(markdown(records))
    print(
        f"{len(records)} records in {args.out} ({time.perf_counter() - t0:.0f} s; runs in {work})"
    )


if __name__ == "__main__":
    main()
