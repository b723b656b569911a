"""EpmVG vs its control (epmvg_no_distill) with the default teacher, over several student seeds.

    PYTHONPATH=$PWD python benchmarks/compare_epmvg.py [--params params.yaml] [--seeds 0 1 2]
                                                       [--work outputs/compare_epmvg]

Needs the prepared data of `params.yaml` (dvc repro prepare, or python -m flows.generate and
python -m flows.prepare). Trains the teacher once (as the `teacher` stage does, into
<work>/teacher), then for every seed trains both students with `train.seed` = that seed and their
params.yaml epochs (equal: distill_methods.epmvg and methods.epmvg_no_distill), and prints:
- the teacher's figures: recall@1 on its own corpus's held-out images (caption -> image,
  image -> caption) with chance, and on the grounding val split (expression -> object among its
  image's referred objects) with chance (the mean of 1 / referred objects of the expression's
  image);
- val Acc@0.5 of each student per seed, the per-seed differences, their mean, and whether the mean
  lies inside the seed spread (the range of either method's val Acc@0.5 over the seeds).
Library calls only (no MLflow, no Prefect); everything is written under --work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PAIR = ("epmvg", "epmvg_no_distill")


def val_chance(cfg) -> float:
    """Expected image_recall@1 of a random pick among the referred objects of the expression's
    image."""
    from refvg.data.prepare import prepared_path

    records = json.loads((prepared_path(cfg) / "val" / "samples.json").read_text())
    objects: dict = {}
    for r in records:
        objects.setdefault(r["image_index"], set()).add(r["ann_id"])
    return statistics.fmean(1 / len(objects[r["image_index"]]) for r in records)


def print_teacher(meta: dict, chance: float, seconds: float | None) -> None:
    c, v = meta["corpus"], meta["val"]
    took = f"{seconds:.0f} s wall" if seconds is not None else "reused"
    print(
        f"teacher ({took}): its corpus, {c['held_out_images']} held-out images (trained on "
        f"{c['images']}, {c['images_shared_with_grounding']} shared with the grounding splits)"
    )
    print(
        f"  caption -> image recall@1 {c['text_recall@1']:.3f}  recall@5 {c['text_recall@5']:.3f}"
    )
    print(
        f"  image -> caption recall@1 {c['image_recall@1']:.3f}  "
        f"recall@5 {c['image_recall@5']:.3f}  (chance@1 {c['chance@1']:.4f})"
    )
    print(
        f"  grounding val, expression -> object of its image: recall@1 "
        f"{v['image_recall@1']:.3f} (chance {chance:.3f}); among all val objects "
        f"{v['recall@1']:.3f}",
        flush=True,
    )


def main() -> None:
    from refvg import stages
    from refvg.config import _validate, load_config

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--work", default="outputs/compare_epmvg")
    # To spread the runs over processes (one thread each: on a loaded machine two torch threads
    # spend most of their time waiting for each other): each run's figure is kept in
    # <work>/seed<s>/<method>.json; the table is printed from every such file of --seeds, and a run
    # already there is not repeated.
    parser.add_argument("--methods", nargs="+", default=list(PAIR), choices=PAIR)
    parser.add_argument(
        "--reuse-teacher",
        action="store_true",
        help="read the teacher's figures from <work>/teacher when it is there",
    )
    args = parser.parse_args()
    work = Path(args.work)
    base = load_config(args.params).model_dump(mode="json")
    base["teacher"]["out_dir"] = str(work / "teacher")
    base["methods"] = {k: v for k, v in base["methods"].items() if k in PAIR}
    base["distill_methods"] = {k: v for k, v in base["distill_methods"].items() if k in PAIR}
    if set(base["methods"]) | set(base["distill_methods"]) != set(PAIR):
        raise SystemExit(f"{args.params}: needs methods.epmvg_no_distill and distill_methods.epmvg")
    cfg = _validate(base, args.params)
    epochs = {m: cfg.for_method(m).train.epochs for m in PAIR}
    if len(set(epochs.values())) != 1:
        raise SystemExit(
            f"{args.params}: the pair trains for different epochs {epochs}; make them equal"
        )

    manifest = work / "teacher" / "features" / "manifest.json"
    if args.reuse_teacher and manifest.exists():
        print_teacher(json.loads(manifest.read_text()), val_chance(cfg), None)
    elif "epmvg" in args.methods:
        t0 = time.perf_counter()
        taught = stages.teacher(cfg)
        print_teacher(taught["features"], val_chance(cfg), time.perf_counter() - t0)

    for seed in args.seeds:
        raw = json.loads(json.dumps(base))
        raw["train"]["seed"] = seed
        raw["train"]["checkpoint_dir"] = str(work / f"seed{seed}")
        run_cfg = _validate(raw, f"{args.params} (train.seed {seed})")
        for method in args.methods:
            out = work / f"seed{seed}" / f"{method}.json"
            if out.exists():
                continue
            t1 = time.perf_counter()
            result = stages.train_method(run_cfg, method)
            acc = float(result.history[-1]["val/acc@0.5"])
            out.write_text(json.dumps({"acc@0.5": acc, "epochs": epochs[method]}) + "\n")
            print(
                f"seed {seed} {method:17s} val Acc@0.5 {acc:.4f} "
                f"({epochs[method]} epochs, {time.perf_counter() - t1:.0f} s wall)",
                flush=True,
            )

    done = [s for s in args.seeds if all((work / f"seed{s}" / f"{m}.json").exists() for m in PAIR)]
    if not done:
        return
    acc = {
        m: [json.loads((work / f"seed{s}" / f"{m}.json").read_text())["acc@0.5"] for s in done]
        for m in PAIR
    }
    diffs = [a - b for a, b in zip(acc[PAIR[0]], acc[PAIR[1]])]
    spread = max(max(a) - min(a) for a in acc.values())
    mean = statistics.fmean(diffs)
    print(f"\n| seed | {PAIR[0]} | {PAIR[1]} | difference |\n|---|---|---|---|")
    for seed, a, b, d in zip(done, acc[PAIR[0]], acc[PAIR[1]], diffs):
        print(f"| {seed} | {a:.4f} | {b:.4f} | {d:+.4f} |")
    means = [statistics.fmean(acc[m]) for m in PAIR]
    print(f"| mean | {means[0]:.4f} | {means[1]:.4f} | {mean:+.4f} |")
    verdict = (
        ("inside noise" if abs(mean) <= spread else "outside the seed spread")
        if len(done) > 1
        else "one seed: no spread to compare with"
    )
    print(
        f"\nmean difference {mean:+.4f} over seeds {done}; seed spread (largest range of one "
        f"method over the seeds) {spread:.4f}: {verdict}"
    )


if __name__ == "__main__":
    main()
