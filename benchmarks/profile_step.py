"""Where one training step's CPU time goes: torch.profiler over forward + backward + AdamW steps of
a box model at the default pipeline size, after one warm-up step.

    python benchmarks/profile_step.py [--model qrnet] [--batch 64] [--steps 5] [--rows 25]

Every op is attributed to the module that ran it (forward hooks open a profiler range per module; a
backward op goes to the module whose forward op has its autograd sequence number) and to that
module's
owner: the innermost module whose class is not a torch.nn building block, e.g.
`refvg.models.qrnet.QueryFPN` or `transformers...SwinAttention`. Each (module, phase, op, input
shapes) counts its least time over the profiled steps: on a shared machine that is the closest to
its uncontended cost. Prints the time per owner, the layout ops (copy_, fill_, cat, clone) per
owner, then the costliest ops.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import model_config, synthetic_batch  # noqa: E402

LAYOUT_OPS = ("aten::copy_", "aten::fill_", "aten::cat", "aten::clone")


def owner_of(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def label_modules(model) -> dict[int, tuple[str, str]]:
    """id(module) -> (its name, its owner: itself, or its nearest ancestor that is not
    torch.nn's)."""
    out = {}

    def walk(module, name: str, owner: str) -> None:
        if not type(module).__module__.startswith("torch.nn"):
            owner = owner_of(module)
        out[id(module)] = (name or "(model)", owner)
        for child, sub in module.named_children():
            walk(sub, f"{name}.{child}" if name else child, owner)

    walk(model, "", owner_of(model))
    return out


def hook_ranges(model, labels) -> None:
    """A profiler range named mod::<name>::<owner> around each module's forward."""
    import torch

    open_ranges: dict[int, list] = {}

    def pre(module, _args):
        name, owner = labels[id(module)]
        handle = torch.ops.profiler._record_function_enter_new(f"mod::{name}::{owner}", None)
        open_ranges.setdefault(id(module), []).append(handle)

    def post(module, _args, _out):
        torch.ops.profiler._record_function_exit._RecordFunction(open_ranges[id(module)].pop())

    for module in model.modules():
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def attribute(events) -> dict[tuple, float]:
    """(module range, phase, op, shapes) -> self CPU microseconds, for one profiled step."""

    def enclosing(e):
        p = e.cpu_parent
        while p is not None and not p.name.startswith("mod::"):
            p = p.cpu_parent
        return p.name if p is not None else None

    forward_of = {}
    for e in events:
        if e.sequence_nr >= 0 and "Backward" not in e.name and not e.name.startswith("autograd"):
            forward_of.setdefault(e.sequence_nr, enclosing(e))

    def where(e) -> tuple[str, str]:
        p = e
        while p is not None:
            if p.name == "optimizer step":
                return "mod::(optimizer)::torch.optim.AdamW", "step"
            if "Backward" in p.name and p.sequence_nr >= 0:
                return forward_of.get(p.sequence_nr) or "mod::(loss)::-", "bwd"
            if p.name.startswith("mod::"):
                return p.name, "fwd"
            p = p.cpu_parent
        return "mod::(loss)::-", "fwd"

    out: dict[tuple, float] = collections.defaultdict(float)
    for e in events:
        if e.name.startswith("mod::") or e.name == "optimizer step":
            continue
        scope, phase = where(e)
        out[(scope, phase, e.name, str(e.input_shapes)[:70])] += e.self_cpu_time_total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="qrnet")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--steps", type=int, default=5, help="profiled steps; each op counts its least time"
    )
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from refvg.engine.runtime import seed_everything, to_device
    from refvg.engine.trainer import build_optimizer
    from refvg.models import build_model

    device = torch.device("cpu")
    cfg = model_config(args.model, args.image_size, False)
    seed_everything(0)
    model = build_model(
        args.model, cfg, vocab_size=cfg.model.text.vocab_size, pad_token_id=0
    ).train()
    opt = build_optimizer(model, cfg.train, device)
    data = to_device(synthetic_batch(cfg, args.batch), device)
    hook_ranges(model, label_modules(model))

    def step():
        loss = model.compute_loss(model(data), data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with record_function("optimizer step"):
            opt.step()

    step()  # warm-up
    steps = []
    for _ in range(args.steps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        steps.append(attribute(prof.events()))
    least = {k: min(s.get(k, 0.0) for s in steps) for k in set().union(*steps)}
    total = sum(least.values())
    print(
        f"{args.model}, {args.image_size}x{args.image_size}, batch "
        f"{args.batch}, {torch.get_num_threads()} "
        f"threads: {total / 1e3:.1f} ms of self CPU time per step "
        f"(each op's least over {args.steps} steps)"
    )
    by_owner: dict[str, float] = collections.Counter()
    layout: dict[tuple[str, str], float] = collections.Counter()
    for (scope, _, op, _), us in least.items():
        owner = scope.split("::")[2]
        by_owner[owner] += us
        if op in LAYOUT_OPS:
            layout[(owner, op)] += us
    print(f"\n{'ms':>8}{'share':>8}  owner (innermost module class that is not torch.nn's)")
    for owner, us in by_owner.most_common():
        print(f"{us / 1e3:>8.1f}{100 * us / total:>7.1f}%  {owner}")
    print(f"\n{'ms':>8}{'share':>8}  layout ops ({', '.join(LAYOUT_OPS)}) by owner")
    for (owner, op), us in layout.most_common(12):
        print(f"{us / 1e3:>8.1f}{100 * us / total:>7.1f}%  {op:<13} {owner}")
    print(f"\n{'ms':>8}  phase  module / op / input shapes")
    for (scope, phase, op, shapes), us in sorted(least.items(), key=lambda kv: -kv[1])[: args.rows]:
        print(f"{us / 1e3:>8.2f}  {phase:<5}  {scope.split('::')[1]}  {op} {shapes}")


if __name__ == "__main__":
    main()
