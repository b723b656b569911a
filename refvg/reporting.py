"""The `report` stage: every method's metrics side by side (markdown table + bar chart)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refvg.config import Config  # noqa: E402


def collect(cfg: Config) -> dict[str, dict]:
    """method -> metrics payload, for each method of params.yaml that has been evaluated."""
    out = {}
    for method in cfg.all_methods:
        path = Path(cfg.eval.metrics_dir) / f"{method}.json"
        if path.exists():
            out[method] = json.loads(path.read_text())
    return out


def write_summary(cfg: Config, out_dir: Path) -> Path:
    results = collect(cfg)
    order = cfg.data.vocabulary().splits
    found = {s for r in results.values() for s in r["splits"]}
    splits = [s for s in order if s in found] + sorted(found - set(order))
    lines = [
        f"# refvg results on {cfg.data.dataset}",
        "",
        "Acc@0.5 per split (fraction of expressions whose predicted "
        "box has IoU >= 0.5 with the target), "
        "and the mean accuracy over IoU thresholds 0.5:0.95 on val.",
        "",
        "| method | model | language | image | " + " | ".join(splits) + " | val Acc@0.5:0.95 |",
        "|---|---|---|---|" + "---|" * len(splits) + "---|",
    ]
    for method, r in results.items():
        accs = [f"{r['splits'][s]['acc@0.5']:.3f}" if s in r["splits"] else "-" for s in splits]
        strict = r["splits"].get("val", {}).get("acc@0.5:0.95")
        lang = "blind (control)" if r.get("language_blind") else "yes"
        image = "blind (control)" if r.get("image_blind") else "yes"
        strict_txt = f"{strict:.3f}" if strict is not None else "-"
        lines.append(
            f"| {method} | {r['model']} | {lang} | {image} | "
            + " | ".join(accs)
            + f" | {strict_txt} |"
        )
    lines += _weak_note(results)
    lines += _mask_table(results, splits)
    lines += _ranking_table(results, splits)
    lines += _distillation_table(cfg, results, splits)
    missing = [m for m in cfg.all_methods if m not in results]
    if missing:
        lines += ["", f"Not evaluated yet: {', '.join(missing)}."]
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    _bar_chart(results, splits, out_dir / "comparison.png")
    return summary


def _weak_note(results: dict) -> list[str]:
    """Which rows are weakly supervised: their accuracy is not comparable to the fully supervised
    rows'."""
    weak = [m for m, r in results.items() if r.get("supervision") == "weak"]
    if not weak:
        return []
    return [
        "",
        f"Weakly supervised (trained on image-sentence pairs only: no "
        f"box, mask or target id; the box is "
        f"read off a Grad-CAM): {', '.join(weak)}. The other rows are fully supervised.",
    ]


def _mask_table(results: dict, splits: list[str]) -> list[str]:
    """Referring segmentation: oIoU / mIoU / prec@0.5 per split, for the methods that output
    masks."""

    def cell(split_metrics: dict) -> str:
        m = split_metrics.get("mask")
        return f"{m['oIoU']:.3f} / {m['mIoU']:.3f} / {m['prec@0.5']:.3f}" if m else "-"

    return _per_split_table(
        results,
        splits,
        "mask",
        cell,
        "oIoU / mIoU / prec@0.5",
        "Masks (methods that segment): oIoU (total intersection / "
        "total union over the split), mIoU (mean "
        "per-expression IoU) and prec@0.5 (fraction with IoU >= "
        "0.5), at the original image resolution.",
    )


def _ranking_table(results: dict, splits: list[str]) -> list[str]:
    """Methods that rank candidate boxes: Acc@0.5 next to its ceiling, the fraction of expressions
    whose target is among the candidates at all (a sample without it is a miss), per split and
    proposal source."""

    def cell(split_metrics: dict) -> str:
        c = split_metrics.get("candidates")
        return f"{split_metrics['acc@0.5']:.3f} / {c['target_recall']:.3f}" if c else "-"

    return _per_split_table(
        results,
        splits,
        "candidates",
        cell,
        "Acc@0.5 / recall",
        "Candidate ranking (methods that pick one of the image's "
        "candidate boxes): Acc@0.5 / target recall, the "
        "fraction of expressions whose target is among the "
        "candidates (IoU >= proposals.match_iou), the ceiling "
        "of Acc@0.5. gt: the image's annotated objects; detections: "
        "a detector's boxes (here the `detections` "
        "stage's stand-in).",
        extra=("proposals", lambda r: r.get("proposals", {}).get("source", "-")),
    )


def _per_split_table(
    results: dict,
    splits: list[str],
    key: str,
    cell,
    cell_title: str,
    intro: str,
    extra: tuple | None = None,
) -> list[str]:
    """A markdown table of the methods whose metrics hold `key` in some split: one `cell(split
    metrics)` per split, after an optional (column title, value of the method's payload) column."""
    rows = {m: r for m, r in results.items() if any(key in v for v in r["splits"].values())}
    if not rows:
        return []
    extra_title = f" {extra[0]} |" if extra else ""
    lines = [
        "",
        intro,
        "",
        f"| method |{extra_title} " + " | ".join(f"{s} {cell_title}" for s in splits) + " |",
        "|---|" + ("---|" if extra else "") + "---|" * len(splits),
    ]
    for method, r in rows.items():
        extra_cell = f" {extra[1](r)} |" if extra else ""
        cells = [cell(r["splits"].get(s, {})) for s in splits]
        lines.append(f"| {method} |{extra_cell} " + " | ".join(cells) + " |")
    return lines


def _distillation_table(cfg: Config, results: dict, splits: list[str]) -> list[str]:
    """Each method of distill_methods next to the method of `methods` with the same model (the same
    student without the teacher), Acc@0.5 per split and the difference the distillation makes."""
    rows = []
    for method in cfg.distill_methods:
        r = results.get(method)
        plain = [
            m
            for m, c in cfg.methods.items()
            if c.model == cfg.distill_methods[method].model and m in results
        ]
        if r is None or not plain:
            continue
        base = results[plain[0]]
        cells = []
        for s in splits:
            a, b = r["splits"].get(s, {}).get("acc@0.5"), base["splits"].get(s, {}).get("acc@0.5")
            cells.append(
                f"{a:.3f} vs {b:.3f} ({a - b:+.3f})" if a is not None and b is not None else "-"
            )
        rows.append(
            f"| {method} vs {plain[0]} | "
            + " | ".join(cells)
            + f" | {r.get('best_epoch')} / {base.get('best_epoch')} |"
        )
    if not rows:
        return []
    return [
        "",
        "Distillation: each distilling method against the same model "
        "trained without the teacher (Acc@0.5, "
        "with distillation vs without, and the difference).",
        "",
        "| with vs without | " + " | ".join(splits) + " | best epoch |",
        "|---|" + "---|" * len(splits) + "---|",
        *rows,
    ]


def _bar_chart(results: dict, splits: list[str], path: Path) -> None:
    fig, ax = plt.subplots(
        figsize=(1.5 + 1.2 * max(len(results), 1) * max(len(splits), 1) / 2, 3.5), dpi=100
    )
    width = 0.8 / max(len(results), 1)
    for i, (method, r) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(splits))]
        ax.bar(xs, [r["splits"].get(s, {}).get("acc@0.5", 0) for s in splits], width, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))], splits)
    ax.set(ylabel="Acc@0.5", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
