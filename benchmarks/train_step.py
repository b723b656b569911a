"""Training-step speed of the box models: forward + backward + AdamW step, after warm-up, median of
repeats.

    python benchmarks/train_step.py [--models transvg qrnet] [--image-size 64] [--batch 64]
                                    [--real-size] [--device auto] [--variants fp32-eager ...]
                                    [--compare-with GIT_REF] [--rounds N] [--json rows.json]
    python benchmarks/train_step.py --ab GIT_REF [--models qrnet] [--pairs 8]

Prints samples/s and peak memory for fp32 vs bf16 autocast and eager vs `torch.compile`, and each
variant's speed relative to fp32 eager of the same model (`--rounds N`: every row N times,
interleaved, medians). Also how close to the hardware each runs:
the FLOPs of one step (forward + backward, counted by torch.utils.flop_counter.FlopCounterMode:
matmuls, convolutions, attention; the optimizer's elementwise update is not counted), the achieved
FLOP/s, and that over the machine's matmul peak measured in the same process with the same thread
count (a large fp32 matmul). Every (model, variant) runs in its own process, so peak memory (CUDA:
max allocated; CPU: peak RSS growth) and compile caches are its own. `--real-size`: the papers'
sizes built from config (no download): Swin-T / ResNet-50 visual backbone, BERT-base text encoder,
6-layer 256-d transformers, stride-32 tokens (qrnet: FPN over strides 4-32, tokens at strides 32 and
64). `--ab GIT_REF`: refvg as of GIT_REF and this tree's refvg imported side by side in ONE process,
one model each with the same weights (the ref's state dict loaded strictly into this tree's model),
their outputs and gradients compared, then fp32 eager training steps alternating A B B A ... so a
busy machine's load falls on both alike; prints the median step time of each (wall, and the
process's CPU time, which a loaded machine inflates far less), the ratios, and each one's share of a
matmul peak measured between the steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("fp32-eager", "bf16-eager", "fp32-compiled", "bf16-compiled")

REAL_SIZE = {
    "text": {
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 30522,
    },
    "fusion": {
        "d_model": 256,
        "num_layers": 6,
        "num_heads": 8,
        "ffn_dim": 2048,
        "visual_encoder_layers": 6,
    },
}
REAL_VISUAL = {
    "transvg": {
        "kind": "resnet",
        "hidden_sizes": [256, 512, 1024, 2048],
        "depths": [3, 4, 6, 3],
        "out_stages": [3],
    },
    "qrnet": {
        "kind": "swin",
        "embed_dim": 96,
        "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24],
        "out_stages": [0, 1, 2, 3],
    },
}


def model_config(model: str, image_size: int, real_size: bool):
    from refvg.config import Config, _deep_merge

    raw = Config().model_dump(mode="python")
    over: dict = {"data": {"image_size": image_size}}
    if real_size:
        over["model"] = {**REAL_SIZE, "visual": REAL_VISUAL[model]}
    elif model == "qrnet":
        over["model"] = {
            "visual": {"kind": "swin", "out_stages": [0, 1]}
        }  # the default pipeline's qrnet
    return Config.model_validate(_deep_merge(raw, over))


def synthetic_batch(cfg, batch: int, tokens: int = 12) -> dict:
    import torch

    s = cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, s, s, dtype=torch.bool)
    mask[:, :, int(s * 0.8) :] = True  # letterbox padding, as in real batches
    return {
        "image": torch.randint(0, 255, (batch, s, s, 3), dtype=torch.uint8, generator=g),
        "pixel_mask": mask,
        "input_ids": torch.randint(5, cfg.model.text.vocab_size, (batch, tokens), generator=g),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
        "box": torch.cat(
            [
                0.3 + 0.4 * torch.rand(batch, 2, generator=g),
                0.1 + 0.3 * torch.rand(batch, 2, generator=g),
            ],
            1,
        ),
    }


def run_one(
    model_name: str,
    variant: str,
    image_size: int,
    batch: int,
    steps: int,
    repeats: int,
    real_size: bool,
    device_name: str,
) -> dict:
    """One (model, variant) in this process: median samples/s over `repeats` timings of `steps`
    steps."""
    import torch

    from refvg.engine.runtime import autocast, resolve_device, seed_everything, to_device
    from refvg.engine.trainer import build_optimizer
    from refvg.models import build_model

    precision, mode = variant.split("-")
    cfg = model_config(model_name, image_size, real_size)
    device = resolve_device(device_name)
    seed_everything(0)
    model = (
        build_model(model_name, cfg, vocab_size=cfg.model.text.vocab_size, pad_token_id=0)
        .to(device)
        .train()
    )
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if mode == "compiled" else model
    opt = build_optimizer(model, cfg.train, device)
    data = to_device(synthetic_batch(cfg, batch), device)
    amp = "bf16" if precision == "bf16" else "off"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step_on(m):
        with autocast(device, amp):
            loss = model.compute_loss(m(data), data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def step():
        step_on(step_model)
        opt.step()

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up: compilation, allocator, autotuning
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(steps * batch / (time.perf_counter() - t0))
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is KiB on Linux: the growth over the model's construction is the step's working set
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    flops = step_flops(
        lambda: step_on(model)
    )  # eager: the same math, and the counter sees every op
    peak = matmul_peak_flops(device)
    steps_per_s = statistics.median(rates) / batch
    return {
        "model": model_name,
        "variant": variant,
        "samples_per_s": statistics.median(rates),
        "peak_mib": peak_mib,
        "warmup_s": warmup_s,
        "device": str(device),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "flops_per_step": flops,
        "achieved_flops": flops * steps_per_s,
        "peak_flops": peak,
        "threads": torch.get_num_threads(),
    }


def step_flops(fn) -> float:
    """FLOPs of one call of `fn` (a forward + backward), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak_flops(device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul here, now, with this process's threads: the ceiling a training
    step could reach on this machine (its best case; a step also runs ops that are not matmuls)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=["transvg", "qrnet"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--real-size", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--variant-timeout", type=float, default=600, help="seconds one (model, variant) may take"
    )
    ap.add_argument(
        "--compare-with",
        metavar="GIT_REF",
        help="also run refvg as of this git ref (e.g. HEAD~1), interleaved, and print ratios",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every (model, variant, code) this many times, interleaved; report medians",
    )
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument(
        "--ab",
        metavar="GIT_REF",
        help="in one process: this tree vs GIT_REF, same weights, alternating steps (see above)",
    )
    ap.add_argument("--pairs", type=int, default=8, help="--ab: timed step pairs per model")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    common = dict(
        image_size=args.image_size,
        batch=args.batch,
        steps=args.steps,
        repeats=args.repeats,
        real_size=args.real_size,
        device_name=args.device,
    )
    if args.one:
        print(json.dumps(run_one(*args.one, **common)))
        return
    if args.ab:
        for model in args.models:
            ab_in_process(model, args.ab, args)
        return

    codes = [("this tree", None)]
    if args.compare_with:
        codes.insert(0, (args.compare_with, export_tree(args.compare_with)))
    rounds = []
    for i in range(args.rounds):
        rows = []
        for model in args.models:
            for variant in args.variants:
                # before and after side by side, the order alternating between rounds: the
                # machine's load hits both alike
                for label, tree in codes if i % 2 == 0 else codes[::-1]:
                    row = run_variant(model, variant, args, tree)
                    rows.append({**row, "code": label})
        rounds.append(rows)
    rows = median_rows(rounds) if args.rounds > 1 else rounds[0]
    print_tables(rows, args, [label for label, _ in codes])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """One row per (model, variant, code): samples/s, the matmul peak and the share of it as medians
    over the rounds (a shared machine's load drifts between rounds; each round's own peak goes with
    its own step rate)."""
    out = []
    for first in rounds[0]:
        key = (first["model"], first["variant"], first.get("code"))
        same = [
            r
            for rows in rounds
            for r in rows
            if (r["model"], r["variant"], r.get("code")) == key
            and not r.get("timed_out")
            and not r.get("failed")
        ]
        if not same:
            out.append(first)
            continue
        share = statistics.median(r["achieved_flops"] / r["peak_flops"] for r in same)
        peak = statistics.median(r["peak_flops"] for r in same)
        out.append(
            {
                **same[0],
                "samples_per_s": statistics.median(r["samples_per_s"] for r in same),
                "peak_mib": statistics.median(r["peak_mib"] for r in same),
                "warmup_s": statistics.median(r["warmup_s"] for r in same),
                "peak_flops": peak,
                "achieved_flops": share * peak,  # so the table's % is the median share
                "rounds": len(same),
            }
        )
    return out


def export_tree(ref: str) -> str:
    """The refvg package as of git `ref`, in a temporary folder to put first on PYTHONPATH."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tempfile.mkdtemp(prefix="refvg-bench-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", ref, "refvg"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return out


@contextlib.contextmanager
def refvg_from(tree: str | None):
    """Import refvg afresh from `tree` (None: the usual path) inside the block; what is built there
    keeps that copy's code (its functions hold their own modules' globals). sys.modules is restored
    after."""

    def take() -> dict:
        return {
            k: sys.modules.pop(k)
            for k in list(sys.modules)
            if k == "refvg" or k.startswith("refvg.")
        }

    saved = take()
    if tree:
        sys.path.insert(0, tree)
    try:
        yield
    finally:
        if tree:
            sys.path.remove(tree)
        take()
        sys.modules.update(saved)


def ab_in_process(model_name: str, ref: str, args) -> None:
    import torch

    device = torch.device("cpu")
    arms = {}
    for label, tree in ((ref, export_tree(ref)), ("this tree", None)):
        with refvg_from(tree):
            from refvg.engine.runtime import seed_everything, to_device
            from refvg.engine.trainer import build_optimizer
            from refvg.models import build_model

            cfg = model_config(model_name, args.image_size, False)
            seed_everything(0)
            model = build_model(
                model_name, cfg, vocab_size=cfg.model.text.vocab_size, pad_token_id=0
            ).train()
            if (
                arms
            ):  # the same weights in both arms; strict: the state dict's keys and shapes must agree
                model.load_state_dict(next(iter(arms.values()))["model"].state_dict())
            # weights that start at zero (QRNet's dynamic layers) would hide differences in the
            # check
            else:
                g = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for p in model.parameters():
                        if not p.any():
                            p.copy_(0.02 * torch.randn(p.shape, generator=g))
            arms[label] = {
                "model": model,
                "opt": build_optimizer(model, cfg.train, device),
                "data": to_device(synthetic_batch(cfg, args.batch), device),
                "times": [],
                "cpu": [],
            }

    def forward_backward(arm):
        m, data = arm["model"], arm["data"]
        loss = m.compute_loss(m(data), data)["loss"]
        arm["opt"].zero_grad(set_to_none=True)
        loss.backward()
        return loss

    (a, b) = arms.values()
    la, lb = forward_backward(a), forward_backward(b)
    pairs = [
        (pa.grad, pb.grad)
        for pa, pb in zip(a["model"].parameters(), b["model"].parameters())
        if pa.grad is not None
    ]
    # Relative to each parameter's largest gradient entry, floored at 1e-6 of the model's: gradients
    # that are zero in exact arithmetic (attention key biases) are float noise in both arms.
    floor = 1e-6 * max(ga.abs().max().item() for ga, _ in pairs)
    worst = max(
        (ga - gb).abs().max().item() / max(ga.abs().max().item(), floor) for ga, gb in pairs
    )
    print(
        f"{model_name}: loss {la.item():.6f} vs {lb.item():.6f}; "
        f"largest gradient difference, relative to "
        f"its parameter's largest gradient entry: {worst:.1e}"
    )
    flops = step_flops(lambda: forward_backward(b))
    peaks = []
    for i in range(args.pairs + 1):
        for label in (ref, "this tree") if i % 2 == 0 else ("this tree", ref):
            arm = arms[label]
            t0, c0 = time.perf_counter(), time.process_time()
            forward_backward(arm)
            arm["opt"].step()
            if i:  # the first pair warms up
                arm["times"].append(time.perf_counter() - t0)
                arm["cpu"].append(time.process_time() - c0)
        peaks.append(matmul_peak_flops(device, repeats=1))
    peak = max(peaks)
    print(
        f"train step, {args.image_size}x{args.image_size}, batch "
        f"{args.batch}, {torch.get_num_threads()} "
        f"threads, {flops / 1e9:.2f} GFLOP/step; median of {args.pairs} alternating steps per arm; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s (best of {len(peaks)}, measured between the pairs)"
    )
    print(
        f"{'model':<9}{'code':<14}{'s/step':>8}{'samples/s':>11}{'GFLOP/s':>9}{'% of peak':>11}"
        f"{'CPU s/step':>12}"
    )
    for label, arm in arms.items():
        s = statistics.median(arm["times"])
        print(
            f"{model_name:<9}{label:<14}{s:>8.3f}{args.batch / s:>11.1f}{flops / s / 1e9:>9.2f}"
            f"{100 * flops / s / peak:>10.1f}%{statistics.median(arm['cpu']):>12.3f}"
        )
    for what, key in (("wall", "times"), ("CPU time", "cpu")):
        old, new = arms[ref][key], arms["this tree"][key]
        print(
            f"{model_name:<9}this tree / {ref}, {what}: "
            f"{statistics.median(old) / statistics.median(new):.2f}x "
            f"samples/s (median of per-pair ratios "
            f"{statistics.median(o / n for o, n in zip(old, new)):.2f}x)"
        )


def run_variant(model: str, variant: str, args, tree) -> dict:
    import os

    cmd = [
        sys.executable,
        __file__,
        "--one",
        model,
        variant,
        "--image-size",
        str(args.image_size),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ] + (["--real-size"] if args.real_size else [])
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.variant_timeout, env=env
        )
    except (
        subprocess.TimeoutExpired
    ):  # e.g. inductor compiling bf16 kernels on a small CPU for minutes
        print(
            f"{model} {variant}: not done in {args.variant_timeout:.0f} s, left out",
            file=sys.stderr,
        )
        return {"model": model, "variant": variant, "timed_out": True}
    if proc.returncode != 0:
        print(f"{model} {variant}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"model": model, "variant": variant, "failed": True}
    print(f"  done {model} {variant}", file=sys.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_tables(rows: list[dict], args, codes: list[str]) -> None:
    ok = [r for r in rows if not r.get("timed_out") and not r.get("failed")]
    size = "real-size" if args.real_size else "default pipeline size"
    device = next((r["device"] for r in ok), args.device)
    print(
        f"\ntrain step (forward + backward + AdamW), {args.image_size}x{args.image_size}, batch "
        f"{args.batch}, {size}, device {device}; median of {args.repeats} x {args.steps} steps"
        + (f", then of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
    )
    code_col = len(codes) > 1
    head = f"{'model':<9}{'params M':>9}  {'variant':<15}" + (f"{'code':<12}" if code_col else "")
    print(head + f"{'samples/s':>10}{'vs fp32 eager':>15}{'peak MiB':>10}{'warm-up s':>11}")
    for r in rows:
        code = f"{r.get('code', ''):<12}" if code_col else ""
        if r.get("timed_out") or r.get("failed"):
            why = "timed out (over --variant-timeout)" if r.get("timed_out") else "failed"
            print(f"{r['model']:<9}{'':>9}  {r['variant']:<15}{code}{why:>35}")
            continue
        base = next(
            (
                b
                for b in ok
                if b["model"] == r["model"]
                and b["variant"] == "fp32-eager"
                and b.get("code") == r.get("code")
            ),
            None,
        )
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        print(
            f"{r['model']:<9}{r['params_m']:>9.1f}  "
            f"{r['variant']:<15}{code}{r['samples_per_s']:>10.1f}"
            f"{ratio:>15}{r['peak_mib']:>10.0f}{r['warmup_s']:>11.1f}"
        )

    print(
        f"\nhow close to the hardware: FLOPs of one step (forward + "
        f"backward, FlopCounterMode) x steps/s, "
        f"over a {2048}x{2048} fp32 matmul's FLOP/s measured in the same process"
    )
    print(
        f"{'model':<9}{'variant':<15}"
        + (f"{'code':<12}" if code_col else "")
        + f"{'threads':>8}{'GFLOP/step':>12}{'GFLOP/s':>10}{'peak GFLOP/s':>14}{'% of peak':>11}"
    )
    for r in ok:
        code = f"{r.get('code', ''):<12}" if code_col else ""
        print(
            f"{r['model']:<9}{r['variant']:<15}{code}{r['threads']:>8}"
            f"{r['flops_per_step'] / 1e9:>12.2f}"
            f"{r['achieved_flops'] / 1e9:>10.1f}{r['peak_flops'] / 1e9:>14.1f}"
            f"{100 * r['achieved_flops'] / r['peak_flops']:>10.1f}%"
        )
    if code_col:
        before, after = codes
        print(f"\n{after} vs {before} (same run, interleaved): samples/s ratio")
        for r in ok:
            if r.get("code") != after:
                continue
            b = next(
                (
                    x
                    for x in ok
                    if x.get("code") == before
                    and x["model"] == r["model"]
                    and x["variant"] == r["variant"]
                ),
                None,
            )
            if b:
                print(
                    f"  {r['model']:<9}{r['variant']:<15}"
                    f"{r['samples_per_s'] / b['samples_per_s']:.2f}x "
                    f"({b['samples_per_s']:.1f} -> {r['samples_per_s']:.1f} samples/s)"
                )


if __name__ == "__main__":
    main()
