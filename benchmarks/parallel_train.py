"""N trainings side by side on the CPU, as `dvc queue start -j N` runs them: samples/s of each, with
each taking its share of the cores (refvg.engine.runtime.CpuShare) and without (REFVG_CPU_SHARE=0:
every one starts torch's pool with a thread per core).

    python benchmarks/parallel_train.py [--jobs 2] [--steps 20] [--batch 32] [--model transvg]

Each training is its own process running the real train step (forward + backward + AdamW) of a
default-size model on a synthetic batch; they start together (they wait on a file the parent creates
once all are ready) and time `--steps` steps after 3 warm-up steps. Also runs one alone, for
reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> None:
    import torch

    from benchmarks.train_step import model_config, synthetic_batch
    from refvg.engine.runtime import CPU_SHARE, seed_everything, to_device
    from refvg.engine.trainer import build_optimizer
    from refvg.models import build_model

    cfg = model_config(args.model, 64, False)
    seed_everything(0)
    model = build_model(args.model, cfg, vocab_size=cfg.model.text.vocab_size, pad_token_id=0)
    model.train()
    data = to_device(synthetic_batch(cfg, args.batch), torch.device("cpu"))
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))

    def step():  # what the trainer does per batch, its per-step recount of the share included
        CPU_SHARE.refresh()
        loss = model.compute_loss(model(data), data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    CPU_SHARE.enter()
    Path(args.ready).touch()
    while not Path(args.go).exists():  # start together
        time.sleep(0.05)
    for _ in range(3):
        step()
    threads = torch.get_num_threads()  # as timing starts (a peer that ends gives its share back)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - t0
    print(json.dumps({"samples_per_second": args.steps * args.batch / seconds, "threads": threads}))


def run(jobs: int, share: bool, args, folder: Path) -> list[dict]:
    tag = f"{jobs}-{int(share)}"
    go = folder / f"go-{tag}"
    env = {
        **os.environ,
        "REFVG_CPU_SHARE": "1" if share else "0",
        "REFVG_CPU_SLOTS_DIR": str(folder / tag),
    }
    env.pop("OMP_NUM_THREADS", None)
    procs = []
    for i in range(jobs):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--ready",
            str(folder / f"ready-{tag}-{i}"),
            "--go",
            str(go),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--model",
            args.model,
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    try:
        while not all((folder / f"ready-{tag}-{i}").exists() for i in range(jobs)):
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a training process exited before it was ready")
            time.sleep(0.05)
        go.touch()
        return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="transvg")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    ap.add_argument("--go", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        alone = run(1, True, args, folder)[0]
        print(f"{cores} cores, {args.model}, batch {args.batch}, {args.steps} timed steps")
        print(
            f"alone:                 {alone['samples_per_second']:7.1f} samples/s "
            f"({alone['threads']} threads)",
            flush=True,
        )
        for share in (False, True):
            rows = run(args.jobs, share, args, folder)
            each = ", ".join(f"{r['samples_per_second']:.1f} ({r['threads']} thr)" for r in rows)
            total = sum(r["samples_per_second"] for r in rows)
            print(
                f"{args.jobs} side by side, share {'on ' if share else 'off'}: {each}; "
                f"total {total:.1f} samples/s",
                flush=True,
            )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
