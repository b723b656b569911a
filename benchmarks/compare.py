"""Paired comparisons: each paper's method (a) against its ablation or control (b), on the same
data, budget and seeds, with the paper's claim and whether the runs reproduce it.

    python benchmarks/compare.py                         # every pair params.yaml declares, 3 seeds
    python benchmarks/compare.py --seeds 5 --pairs "qrnet vs qrnet_no_qdatt"
    python benchmarks/compare.py --work /tmp/cmp --jobs 2  # rerun with the same --work to resume

Run it in the repository after `dvc repro` (it reuses the prepared data and pretrained weights under
data/, the detections file and the teacher; what is missing it makes first). Any pair of declared
methods can be compared (`--pairs "transvg vs my_variant"` with a params file declaring my_variant);
the claim then reads "a beats b". For each seed s both methods of a pair train with `train.seed = s`
(initial weights, data order) for the epochs params.yaml gives them (a pair whose budgets differ is
refused: such a difference is not the feature's), and are scored on every prepared split but train.

The (method, seed) runs go to `--jobs` worker processes (one torch thread each; a worker's log in
<work>/logs). Each run has its own checkpoint folder <work>/runs/<method>-seed<s>; its metrics land
in <work>/results/<method>-seed<s>.json once it has been evaluated, and a later call with the same
--work, method config and prepared data skips it (a killed run restarts from scratch, never from
a half-trained checkpoint). Each run seeds itself from its seed: results do not depend on --jobs.

Per pair, split and metric (acc@0.5; also the mask mIoU where both methods' metrics have it) it
records the per-seed values, means and sds, the mean paired difference a - b with its 95 %
t-interval, and the verdict against the claim: "reproduced" (interval above 0), "reversed" (below
0), "inconclusive" (contains 0), "one seed". Writes benchmarks/pairs.json and benchmarks/pairs.md
(the README's tables).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (a, b, the paper's claim): a is the paper's method, b its ablation or control; every claim says
# a scores higher than b.
PAIRS = [
    ("qrnet", "qrnet_no_qdatt", "QD-ATT helps"),
    ("qrnet", "transvg_swin", "QRNet beats TransVG on the same Swin backbone"),
    ("transvg", "transvg_blind", "the model uses the expression"),
    ("transvg", "transvg_image_blind", "the model uses the image"),
    ("mattnet_erase", "mattnet_no_erase", "CM-Erase helps (ground-truth candidates)"),
    ("mattnet_erase_det", "mattnet_no_erase_det", "CM-Erase helps (detected candidates)"),
    ("weak_cam", "weak_cam_no_mining", "attention mining helps"),
    ("epmvg", "epmvg_no_distill", "distillation helps"),
    ("cmsa", "cmsa_concat", "cross-modal self-attention beats concatenation fusion"),
]
CLAIMS = {(a, b): claim for a, b, claim in PAIRS}
# metric name -> where it sits in one split's metrics (None: not there)
METRICS = {
    "acc@0.5": lambda m: m.get("acc@0.5"),
    "mask mIoU": lambda m: m.get("mask", {}).get("mIoU"),
}
EVALUATION_ENTRY_POINT = "refvg.stages.evaluate:evaluate_method"  # its code is in the resume key
SD_LIMIT = 0.01  # issue 17: seed-to-seed sd of val acc@0.5 <= 1 point for fully supervised methods


def paired_interval(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """Mean of a - b over paired runs and its two-sided t-interval (nan with fewer than 2 pairs)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = _sd(d)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half, "sd_diff": sd}


def _sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


def verdict(rec: dict) -> str:
    """The interval against the claim that a scores higher than b."""
    if math.isnan(rec["ci_low"]):
        return "one seed"
    return (
        "reproduced" if rec["ci_low"] > 0 else "reversed" if rec["ci_high"] < 0 else "inconclusive"
    )


def _shared_inputs(cfg, base: Path, work: Path) -> None:
    """The prepared data (and data/pretrained), detections and teacher the runs share: those of the
    params file's folder, linked into work and made there if missing."""
    from refvg import stages

    work.mkdir(parents=True, exist_ok=True)
    for name in ("data", Path(cfg.teacher.out_dir).parts[0]):
        src = base / name
        if src.exists() and not (work / name).exists():
            (work / name).symlink_to(src)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        if not (Path(cfg.data.prepared_dir) / cfg.data.dataset / "manifest.json").exists():
            if cfg.data.dataset == "refshapes":
                stages.generate(cfg)
            stages.prepare(cfg)
        if not (Path(cfg.detections.dir) / "methods").exists():
            stages.detections(cfg)
        if cfg.distill_methods and not (Path(cfg.teacher.out_dir) / "features").exists():
            stages.teacher(cfg)
    finally:
        os.chdir(cwd)


def run_config(raw: dict, method: str, seed: int, work: Path):
    """The params with `method` at train.seed = seed, its checkpoints, metrics and plots under its
    own run folder."""
    from refvg.config import METHOD_TABLES, _validate

    raw = json.loads(json.dumps(raw))
    table = next(t for t in METHOD_TABLES if method in (raw.get(t) or {}))
    entry = raw[table][method]
    entry.setdefault("overrides", {}).setdefault("train", {})["seed"] = seed
    run_dir = work / "runs" / f"{method}-seed{seed}"
    raw["train"]["checkpoint_dir"] = str(run_dir / "checkpoints")
    raw["eval"]["metrics_dir"] = str(run_dir / "metrics")
    raw["eval"]["plots_dir"] = str(run_dir / "plots")
    return _validate(raw, source=f"{method} seed {seed}"), run_dir


def result_path(work: Path, method: str, seed: int) -> Path:
    return work / "results" / f"{method}-seed{seed}.json"


def config_key(cfg, method: str, work: Path) -> str:
    """What a finished run's result must match to be reused: what its training reads (the
    `resolve` stage's stamp: the method's resolved config and the code it runs), the evaluation's
    settings and code, and the prepared data's fingerprint (not the detections or teacher files:
    remake those in a new --work). An edit to another method's entry or to unrelated code keeps
    the run."""
    from refvg.data.dataset import prepared_fingerprint
    from refvg.data.prepare import prepared_path
    from refvg.engine.fingerprint import method_stamp, sources_of

    data = prepared_fingerprint(work / prepared_path(cfg))  # relative paths are work's
    evaluation = {
        "eval": cfg.for_method(method).eval.model_dump(mode="json"),
        "code": sources_of(EVALUATION_ENTRY_POINT),
    }
    key = {"training": method_stamp(cfg, method), "evaluation": evaluation, "data": data}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def finished(raw: dict, method: str, seed: int, work: Path) -> dict | None:
    """The saved metrics of this run, if it finished with the same config."""
    path = result_path(work, method, seed)
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    cfg, _ = run_config(raw, method, seed, work)
    return saved if saved.get("config_key") == config_key(cfg, method, work) else None


def run_one(params: Path, method: str, seed: int, work: Path, keep: bool) -> dict:
    """Train and evaluate one run in this process (one torch thread); saves and returns its
    metrics."""
    import torch

    from refvg import stages
    from refvg.tracking import disable_telemetry

    torch.set_num_threads(1)
    disable_telemetry()
    raw = yaml.safe_load(params.read_text())
    cfg, run_dir = run_config(raw, method, seed, work)
    shutil.rmtree(run_dir, ignore_errors=True)  # a killed run starts over: never a half-trained one
    os.chdir(work)
    t0 = time.perf_counter()
    stages.train_method(cfg, method)
    stages.evaluate_method(cfg, method)
    metrics = json.loads((run_dir / "metrics" / f"{method}.json").read_text())
    metrics.update(
        seed=seed,
        epochs=cfg.for_method(method).train.epochs,
        seconds=round(time.perf_counter() - t0, 1),
        config_key=config_key(cfg, method, work),
    )
    if not keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    out = result_path(work, method, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=1) + "\n")
    tmp.replace(out)  # whole or absent: a run killed while writing is not mistaken for finished
    return metrics


def _worker(params: Path, work: Path, keep: bool) -> None:
    """A worker process: runs "METHOD SEED" lines from stdin one after the other (imports paid
    once), answers "ok" or "failed" on its stdout; everything else it prints goes to stderr."""
    import traceback

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        method, seed = line.split()
        try:
            run_one(params, method, int(seed), work, keep)
            answers.write("ok\n")
        except Exception:
            traceback.print_exc()
            answers.write("failed\n")
        answers.flush()


def _train_all(params: Path, todo: list, work: Path, keep: bool, jobs: int) -> dict:
    """The runs in `todo` over `jobs` worker processes, one compute thread each; each run seeds
    itself from its seed, so which worker runs it, and after what, does not matter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--params", str(params)]
    cmd += ["--work", str(work), "--worker"] + (["--keep"] if keep else [])
    tasks: queue.Queue = queue.Queue()
    for k in todo:
        tasks.put(k)
    runs: dict = {}
    (work / "logs").mkdir(parents=True, exist_ok=True)

    def drive(i: int) -> None:
        log_path = work / "logs" / f"worker{i}.log"
        with log_path.open("a") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env
            )
            try:
                while True:
                    try:
                        method, seed = tasks.get_nowait()
                    except queue.Empty:
                        return
                    proc.stdin.write(f"{method} {seed}\n")
                    proc.stdin.flush()
                    if proc.stdout.readline().strip() != "ok":
                        raise RuntimeError(f"{method} seed {seed} failed: see {log_path}")
                    m = runs[(method, seed)] = json.loads(
                        result_path(work, method, seed).read_text()
                    )
                    print(
                        f"  {method} seed {seed}: "
                        + ", ".join(f"{s} {x['acc@0.5']:.3f}" for s, x in m["splits"].items())
                        + f" ({m['seconds']:.0f} s)",
                        flush=True,
                    )
            finally:
                proc.stdin.close()
                proc.wait()

    with ThreadPoolExecutor(max(1, min(jobs, len(todo)))) as pool:
        list(pool.map(drive, range(max(1, min(jobs, len(todo))))))  # re-raises a failure
    return runs


def compare(
    params: Path,
    pairs: list[tuple[str, str]],
    seeds: list[int],
    work: Path,
    keep: bool = False,
    jobs: int = 2,
) -> list[dict]:
    from refvg.config import load_config

    params, work = params.resolve(), work.resolve()
    cfg = load_config(params)
    raw = yaml.safe_load(params.read_text())
    declared = cfg.declared_methods
    for a, b in pairs:
        if a not in declared or b not in declared:
            missing = ", ".join(m for m in (a, b) if m not in declared)
            print(f"skipping {a} vs {b}: {params.name} does not declare {missing}", flush=True)
    pairs = [(a, b) for a, b in pairs if a in declared and b in declared]
    for a, b in pairs:
        ea, eb = cfg.for_method(a).train.epochs, cfg.for_method(b).train.epochs
        if ea != eb:
            raise SystemExit(
                f"{a} trains {ea} epochs and {b} {eb}: a paired comparison needs equal budgets"
            )
    _shared_inputs(cfg, params.parent, work)
    wanted = list(dict.fromkeys((m, s) for s in seeds for a, b in pairs for m in (a, b)))
    runs = {k: r for k in wanted if (r := finished(raw, *k, work)) is not None}
    todo = [k for k in wanted if k not in runs]
    print(f"{len(wanted)} runs: {len(runs)} finished before, {len(todo)} to train", flush=True)
    if todo:
        runs.update(_train_all(params, todo, work, keep, jobs))
    return records_from(runs, pairs, seeds)


def records_from(runs: dict, pairs: list[tuple[str, str]], seeds: list[int]) -> list[dict]:
    """One record per pair, split and metric the two methods' metrics share."""
    records = []
    for a, b in pairs:
        ra, rb = runs[(a, seeds[0])], runs[(b, seeds[0])]
        for split in [s for s in ra["splits"] if s in rb["splits"]]:
            for metric, get in METRICS.items():
                xa = [get(runs[(a, s)]["splits"][split]) for s in seeds]
                xb = [get(runs[(b, s)]["splits"][split]) for s in seeds]
                if None in xa or None in xb:
                    continue
                rec = {
                    "pair": f"{a} vs {b}",
                    "split": split,
                    "seeds": len(seeds),
                    "metric": metric,
                    "claim": CLAIMS.get((a, b), f"{a} beats {b}"),
                    "expected": "a > b",
                    "epochs": ra["epochs"],
                    "seed_list": list(seeds),
                    "a": xa,
                    "b": xb,
                    "a_mean": sum(xa) / len(xa),
                    "b_mean": sum(xb) / len(xb),
                    "a_sd": _sd(xa),
                    "b_sd": _sd(xb),
                    "supervision": {a: ra.get("supervision"), b: rb.get("supervision")},
                    **paired_interval(xa, xb),
                }
                rec["verdict"] = verdict(rec)
                records.append(rec)
    return records


def _f(x: float, fmt: str) -> str:
    return "n/a" if math.isnan(x) else format(x, fmt)


def markdown(records: list[dict]) -> str:
    """The claims on val, the per-method table (acc@0.5 over seeds) and the seed-sd check."""
    lines = [
        "### What reproduces (val; a - b over paired seeds, 95 % t-interval)",
        "",
        "| claim | a vs b | a - b [95 % CI] | verdict |",
        "|---|---|---|---|",
    ]
    for r in records:
        if r["split"] != "val":
            continue
        claim = r["claim"] + ("" if r["metric"] == "acc@0.5" else f" ({r['metric']})")
        plural = "s" if r["seeds"] != 1 else ""
        lines.append(
            f"| {claim} | {r['pair']} | {r['mean_diff']:+.3f} [{_f(r['ci_low'], '+.3f')}, "
            f"{_f(r['ci_high'], '+.3f')}] | {r['verdict']} ({r['seeds']} seed{plural}) |"
        )
    # method -> split -> per-seed acc@0.5, from either side of any pair
    per: dict[str, dict] = {}
    for r in records:
        if r["metric"] != "acc@0.5":
            continue
        a, b = r["pair"].split(" vs ")
        for m, xs in ((a, r["a"]), (b, r["b"])):
            info = per.setdefault(m, {"epochs": r["epochs"], "splits": {}})
            info["splits"][r["split"]] = xs
            info["supervision"] = r.get("supervision", {}).get(m)
    splits = list(dict.fromkeys(s for info in per.values() for s in info["splits"]))
    lines += [
        "",
        "### Per method (acc@0.5, mean ± sd over seeds)",
        "",
        "| method | " + " | ".join(splits) + " | epochs |",
        "|---|" + "---:|" * len(splits) + "---:|",
    ]
    for m, info in per.items():
        cells = [
            f"{sum(x) / len(x):.3f} ± {_f(_sd(x), '.3f')}" if (x := info["splits"].get(s)) else ""
            for s in splits
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {info['epochs']} |")
    full = {
        m: _sd(info["splits"]["val"])
        for m, info in per.items()
        if info.get("supervision") != "weak" and "val" in info["splits"]
    }
    if full:
        worst = max(full.values())
        holds = (
            "n/a (one seed)"
            if math.isnan(worst)
            else "holds"
            if worst <= SD_LIMIT
            else "does not hold"
        )
        lines += [
            "",
            "Seed-to-seed sd of val acc@0.5, fully supervised methods: "
            + ", ".join(f"{m} {_f(sd, '.3f')}" for m, sd in full.items())
            + f". sd <= {SD_LIMIT:.2f} (1 point) for all: {holds}.",
        ]
    return "\n".join(lines) + "\n"


def write_outputs(records: list[dict], out: Path) -> None:
    """pairs.json (records; an undefined sd or interval, one seed's, as null: strict JSON) and
    pairs.md beside it."""
    strict = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
        for r in records
    ]
    out.write_text(json.dumps(strict, indent=1, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(markdown(records))


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
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "pairs.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # see _worker
    args = p.parse_args()
    if args.worker:
        return _worker(args.params.resolve(), args.work.resolve(), args.keep)
    pairs = [tuple(x.split(" vs ")) for x in args.pairs] if args.pairs else PAIRS
    work = args.work or Path(tempfile.mkdtemp(prefix="refvg-compare-"))
    t0 = time.perf_counter()
    records = compare(
        args.params, [p[:2] for p in pairs], list(range(args.seeds)), work, args.keep, args.jobs
    )
    write_outputs(records, args.out)
    print(markdown(records))
    print(
        f"{len(records)} records in {args.out} ({time.perf_counter() - t0:.0f} s; runs in {work})"
    )


if __name__ == "__main__":
    main()
