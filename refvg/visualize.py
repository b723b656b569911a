"""Figures: accuracy vs IoU threshold, and grids of qualitative predictions (predicted vs true box,
and for mask methods predicted vs true mask, with the expression; a ranking model's attention; a
weakly supervised model's Grad-CAMs). `evaluation_figures` draws the evaluate stage's set for a
trained model. Matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from refvg.engine.evaluator import SplitPredictions  # noqa: E402
from refvg.metrics import accuracy_at_iou  # noqa: E402


def _panel_grid(n: int, cols: int, panel_height: float):
    """A figure of ceil(n / cols) x cols panels, axes off (unused ones stay blank)."""
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(3 * cols, panel_height * rows), dpi=90, squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def _box(ax, xyxy, **style) -> None:
    """An xyxy box as an unfilled rectangle unless `style` says otherwise."""
    ax.add_patch(
        plt.Rectangle(
            (xyxy[0], xyxy[1]), xyxy[2] - xyxy[0], xyxy[3] - xyxy[1], **({"fill": False} | style)
        )
    )


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_vs_iou(
    preds: Sequence[SplitPredictions], thresholds, title: str, path: Path
) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for p in preds:
        acc = accuracy_at_iou(p.ious, thresholds)
        ax.plot(list(acc), list(acc.values()), marker="o", label=f"{p.split} (n={len(p.ious)})")
    ax.set(xlabel="IoU threshold", ylabel="accuracy", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_qualitative(
    images: Sequence[np.ndarray],
    expressions: Sequence[str],
    pred_xyxy: np.ndarray,
    gt_xyxy: np.ndarray,
    ious: np.ndarray,
    path: Path,
    cols: int = 4,
    pred_masks: Optional[Sequence[np.ndarray]] = None,
    gt_masks: Optional[Sequence[np.ndarray]] = None,
    mask_ious: Optional[np.ndarray] = None,
) -> None:
    """One panel per sample: green = ground truth, red = prediction, both in the panel's pixel
    frame. With masks (bool, any resolution of the same image, e.g. the original): the predicted
    mask is tinted red and the true mask outlined in green."""
    if not len(images):
        return
    fig, axes = _panel_grid(len(images), cols, panel_height=3.4)
    for k, (ax, img, text, p, g, iou) in enumerate(
        zip(axes.flat, images, expressions, pred_xyxy, gt_xyxy, ious)
    ):
        ax.imshow(img)
        extent = (
            -0.5,
            img.shape[1] - 0.5,
            img.shape[0] - 0.5,
            -0.5,
        )  # a mask of any resolution covers the image
        if pred_masks is not None:
            tint = np.zeros((*pred_masks[k].shape, 4))
            tint[pred_masks[k]] = (1.0, 0.0, 0.0, 0.45)
            ax.imshow(tint, extent=extent, interpolation="nearest")
        if gt_masks is not None and gt_masks[k].any():
            gh, gw = gt_masks[k].shape
            xs = (np.arange(gw) + 0.5) * img.shape[
                1
            ] / gw - 0.5  # mask pixel centres in the panel's frame
            ys = (np.arange(gh) + 0.5) * img.shape[0] / gh - 0.5
            ax.contour(
                xs, ys, gt_masks[k].astype(float), levels=[0.5], colors="lime", linewidths=1.5
            )
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        for box, color in ((g, "lime"), (p, "red")):
            _box(
                ax,
                box,
                edgecolor=color,
                linewidth=1 if pred_masks is not None else 2,
                linestyle="--" if pred_masks is not None else "-",
            )
        score = (
            f"IoU {iou:.2f}"
            if mask_ious is None
            else f"mask IoU {mask_ious[k]:.2f}, box IoU {iou:.2f}"
        )
        ax.set_title("\n".join(textwrap.wrap(f'"{text}"', 34)[:3]) + f"\n{score}", fontsize=8)
    _save(fig, path)


def draw_grounding(image, box_xyxy, mask=None, color=(255, 0, 0)):
    """The picture `refvg predict` writes: the image with the predicted box (and mask, tinted) drawn
    on it, at the image's own resolution. Returns a new PIL image."""
    from PIL import Image, ImageDraw

    out = image.convert("RGB")
    if mask is not None:
        tint = np.asarray(out, dtype=np.float32)
        tint[mask] = 0.5 * tint[mask] + 0.5 * np.asarray(color, dtype=np.float32)
        out = Image.fromarray(tint.astype(np.uint8))
    width = max(2, round(max(out.size) / 150))
    ImageDraw.Draw(out).rectangle([float(v) for v in box_xyxy], outline=color, width=width)
    return out


def plot_cams(
    images: Sequence[np.ndarray],
    cams: Sequence[np.ndarray],
    expressions: Sequence[str],
    pred_xyxy: np.ndarray,
    gt_xyxy: np.ndarray,
    path: Path,
    cols: int = 4,
) -> None:
    """Class activation maps (weakly supervised methods): each image with its CAM (same pixel frame,
    values in [0, 1]) as a heat map over it, the box read off the CAM in red and the true box in
    green."""
    if not len(images):
        return
    fig, axes = _panel_grid(len(images), cols, panel_height=3.4)
    for ax, img, cam, text, p, g in zip(axes.flat, images, cams, expressions, pred_xyxy, gt_xyxy):
        ax.imshow(img)
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        for box, color in ((g, "lime"), (p, "red")):
            _box(ax, box, edgecolor=color, linewidth=2)
        ax.set_title("\n".join(textwrap.wrap(f'"{text}"', 34)[:3]), fontsize=8)
    _save(fig, path)


def plot_attention(
    images: Sequence[np.ndarray],
    words: Sequence[Sequence[tuple[str, float]]],
    module_weights: np.ndarray,
    chosen_xyxy: np.ndarray,
    cell_xyxy: np.ndarray,
    context_xyxy: np.ndarray,
    gt_xyxy: np.ndarray,
    ious: np.ndarray,
    path: Path,
    cols: int = 4,
) -> None:
    """A ranking model's attention, one panel per sample: the chosen candidate (red), its most
    attended sub-region (yellow, filled), its most attended context object (blue dashed; NaN: none)
    and the target (green); the title gives each word's attention, the subject / location / relation
    module weights and the chosen box's IoU with the target (at the original resolution)."""
    if not len(images):
        return
    fig, axes = _panel_grid(len(images), cols, panel_height=3.6)
    for k, ax in enumerate(axes.flat[: len(images)]):
        img = images[k]
        ax.imshow(img)
        ax.set_xlim(-0.5, img.shape[1] - 0.5)
        ax.set_ylim(img.shape[0] - 0.5, -0.5)
        boxes = (
            (gt_xyxy[k], dict(edgecolor="lime", linewidth=2)),
            (chosen_xyxy[k], dict(edgecolor="red", linewidth=2)),
            (cell_xyxy[k], dict(facecolor="yellow", alpha=0.5, fill=True, edgecolor="yellow")),
            (context_xyxy[k], dict(edgecolor="deepskyblue", linewidth=1.5, linestyle="--")),
        )
        for box, style in boxes:
            if np.isfinite(box).all():
                _box(ax, box, **style)
        text = " ".join(f"{w}({a:.2f})" for w, a in words[k])
        subj, loc, rel = module_weights[k]
        modules = f"subj {subj:.2f} loc {loc:.2f} rel {rel:.2f}, IoU {ious[k]:.2f}"
        ax.set_title("\n".join(textwrap.wrap(text, 36)[:3]) + "\n" + modules, fontsize=7)
    _save(fig, path)


def evaluation_figures(
    model,
    model_name: str,
    preds: Sequence[SplitPredictions],
    ds,
    ecfg,
    title: str,
    tokenizer_dir: Path,
    out_dir: Path,
    device,
    amp: str = "auto",
) -> list[Path]:
    """The evaluate stage's figures in `out_dir`: accuracy vs IoU threshold of every split in
    `preds`, and `ecfg.num_qualitative` samples of `ds` (the split of `preds` the panels show,
    opened as the model saw it): their boxes, with the masks of a mask method, the attention of a
    ranking model (`explain`), and for a weakly supervised one the Grad-CAM each box was read
    from."""
    from torch.utils.data import Subset

    from refvg.engine.evaluator import predict_batches, predict_masks
    from refvg.models.registry import is_weakly_supervised

    figures = [out_dir / "acc_vs_iou.png", out_dir / "qualitative.png"]
    plot_accuracy_vs_iou(preds, ecfg.iou_thresholds, title, figures[0])
    val = next(p for p in preds if p.split == ds.split)
    pick = np.random.default_rng(0).permutation(len(ds))[: ecfg.num_qualitative]
    scale = np.array([[ds.letterboxes[i].scale] for i in pick])
    crops = [
        np.asarray(ds.images[ds.records[i]["image_index"]])[
            : ds.letterboxes[i].content_h, : ds.letterboxes[i].content_w
        ]
        for i in pick
    ]
    overlays = {}
    if val.has_masks:
        overlays = {
            "pred_masks": predict_masks(model, ds, pick, ecfg.batch_size, device, amp),
            "gt_masks": [ds.gt_mask(i) for i in pick],
            "mask_ious": val.mask_inter[pick] / np.maximum(val.mask_union[pick], 1),
        }
    if model.can_explain:  # ranking models: the same panels, with which words and regions decided
        _attention_figure(model, ds, pick, crops, val.ious[pick], device, tokenizer_dir, figures[1])
    else:
        plot_qualitative(
            crops,
            [ds.records[i]["sentence"] for i in pick],
            val.pred_xyxy[pick] * scale,
            val.gt_xyxy[pick] * scale,
            val.ious[pick],
            figures[1],
            **overlays,
        )
    if is_weakly_supervised(model_name):  # the Grad-CAM each box was read from, over its image
        cams = [
            c
            for out in predict_batches(
                model, Subset(ds, pick.tolist()), ecfg.batch_size, device, amp, keys=("cam",)
            )
            for c in out["cam"]
        ]
        figures.append(out_dir / "cams.png")
        plot_cams(
            crops,
            [c[: crop.shape[0], : crop.shape[1]].numpy() for c, crop in zip(cams, crops)],
            [ds.records[i]["sentence"] for i in pick],
            val.pred_xyxy[pick] * scale,
            val.gt_xyxy[pick] * scale,
            figures[-1],
        )
    return figures


def _attention_figure(
    model, ds, pick, crops, ious, device, tokenizer_dir: Path, path: Path
) -> None:
    """The qualitative figure of a ranking model (`explain`): chosen box, target, the word
    attention, the module weights, the most attended sub-region and context object."""
    import torch

    from refvg.data.dataset import collate
    from refvg.data.text import load_tokenizer
    from refvg.data.transforms import cxcywh_to_xyxy
    from refvg.engine.runtime import to_device

    if len(pick) == 0:
        return
    batch = collate([ds[int(i)] for i in pick])
    ex = {k: v.cpu() for k, v in model.explain(to_device(batch, device)).items()}
    tok = load_tokenizer(tokenizer_dir)
    words = []
    for ids, mask, att in zip(batch["input_ids"], batch["attention_mask"], ex["word_attention"]):
        n = int(mask.sum())
        words.append(
            [
                (tok.convert_ids_to_tokens(int(t)), float(a))
                for t, a in zip(ids[1 : n - 1], att[1 : n - 1])
            ]
        )
    size = ds.size
    rows = torch.arange(len(pick))
    chosen = cxcywh_to_xyxy(batch["cand_boxes"][rows, ex["best"]]).numpy() * size
    context = cxcywh_to_xyxy(batch["cand_boxes"][rows, ex["context"].clamp_min(0)]).numpy() * size
    context[ex["context"].numpy() < 0] = np.nan
    target = cxcywh_to_xyxy(batch["box"]).numpy() * size
    plot_attention(
        crops,
        words,
        ex["module_weights"].numpy(),
        chosen,
        ex["cell_box"].numpy() * size,
        context,
        target,
        ious,
        path,
    )
