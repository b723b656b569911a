"""The pipeline's stages as plain library functions: generate, prepare, train, evaluate, report.

The CLI, the Prefect flows and the tests all call these; none of them imports MLflow or Prefect. Each
returns what it produced (paths, metrics) so the caller decides what to log. torch and transformers are
imported by the stages that use them: `generate` and `report` start in a fraction of the time without them.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from refvg.config import Config, _validate
from refvg.data.text import TOKENIZER_DIR

if TYPE_CHECKING:
    import torch

    from refvg.engine.trainer import TrainResult


def synthetic_dir(cfg: Config) -> Path:
    return Path(cfg.data.root) / "refshapes"


def generate(cfg: Config) -> dict:
    from refvg.data.synthetic import generate_refshapes

    return generate_refshapes(synthetic_dir(cfg), cfg.synthetic, split_by=cfg.data.split_by)


def prepare(cfg: Config, run_shards=None) -> dict:
    """`run_shards(letterbox_shard, shards)` runs the image shards (default: one after the other, here)."""
    from refvg.data.prepare import prepare_dataset, run_sequentially

    return prepare_dataset(cfg, run_shards=run_shards or run_sequentially)


def prepared_manifest(cfg: Config) -> Path:
    from refvg.data.dataset import MANIFEST
    from refvg.data.prepare import prepared_path

    return prepared_path(cfg) / MANIFEST


def detections(cfg: Config) -> dict:
    """The `detections` stage: the stand-in detections file (refvg.data.detections) at
    `<detections.dir>/<dataset>.json`, and `<detections.dir>/methods/<method>.json` for every method: the
    candidates it ranks (its proposals settings and its detections file's hash). A method's training depends
    on its own such file (dvc.yaml), so new detections rerun only the methods that rank them."""
    import hashlib

    from refvg.data.detections import detection_recall, stand_in_detections, write_detections

    out = Path(cfg.detections.dir)
    # Split files carry no instances file to perturb: no stand-in then, a real detector's file is the user's.
    stand_in = cfg.data.format == "refer"
    rows = stand_in_detections(instances_path(cfg), cfg.detections) if stand_in else []
    path = write_detections(rows, out / f"{cfg.data.dataset}.json")
    stamps = out / "methods"
    shutil.rmtree(stamps, ignore_errors=True)
    stamps.mkdir(parents=True)
    for method in cfg.all_methods:
        pcfg = cfg.for_method(method).proposals
        stamp = {"source": pcfg.source}
        if pcfg.source == "detections":
            det = Path(pcfg.detections_file)
            if not det.is_file():
                raise FileNotFoundError(f"methods.{method}: proposals.detections_file {det} does not exist")
            stamp |= {"detections_file": str(det), "sha256": hashlib.sha256(det.read_bytes()).hexdigest(),
                      "min_score": pcfg.min_score}
        (stamps / f"{method}.json").write_text(json.dumps(stamp, indent=1) + "\n")
    recall = detection_recall(instances_path(cfg), rows) if stand_in else {}
    return {"file": path, "detections": len(rows), **recall}


def checkpoint_dir(cfg: Config, method: str) -> Path:
    return Path(cfg.train.checkpoint_dir) / method


def train_method(cfg: Config, method: str, on_epoch_end: Callable[[dict, int], None] = lambda m, e: None) -> TrainResult:
    import torch

    from refvg.data.dataset import prepared_fingerprint, read_manifest
    from refvg.data.prepare import prepared_path
    from refvg.engine.distributed import env_rank
    from refvg.engine.evaluator import box_metrics, mask_metrics, match_metrics, predict_split
    from refvg.engine.runtime import resolve_device, seed_everything
    from refvg.engine.trainer import train
    from refvg.models import build_model, model_needs
    from refvg.models.registry import is_weakly_supervised

    rcfg = cfg.for_method(method)  # raises for a method params.yaml does not declare
    mcfg = cfg.all_methods[method]
    prepared = prepared_path(rcfg)
    manifest = read_manifest(prepared)
    train_set = open_split(rcfg, mcfg.model, "train", mcfg.language_blind, training=True)
    data_version = prepared_fingerprint(prepared)
    if "teacher" in model_needs(mcfg.model, rcfg):
        train_set, teacher_version = with_teacher_features(cfg, method, train_set, prepared)
        data_version += f"+teacher:{teacher_version}"  # a new teacher must not resume the old student
    weak = is_weakly_supervised(mcfg.model)
    # Weak end to end: a weak method validates on the val split's image-sentence pairs (a WeakSplit: no
    # box to read) and best.pt is chosen by its model's box-free criterion, never by Acc@0.5.
    val_set = open_split(rcfg, mcfg.model, "val", mcfg.language_blind, training=weak)
    seed_everything(rcfg.train.seed)  # before the model exists: its initial weights are part of the run
    model = build_model(mcfg.model, rcfg, vocab_size=manifest["vocab_size"], pad_token_id=manifest["pad_token_id"])
    device = resolve_device(rcfg.train.device)
    # A checkpoint folder is self-contained: the tokenizer travels with the weights (written by rank 0 only).
    if env_rank() == 0:
        shutil.copytree(prepared / TOKENIZER_DIR, checkpoint_dir(cfg, method) / TOKENIZER_DIR, dirs_exist_ok=True)

    def evaluate(m: torch.nn.Module) -> dict:
        if weak:
            return match_metrics(m, val_set, rcfg.eval.batch_size, device, rcfg.train.amp)
        pred = predict_split(m, val_set, rcfg.eval.batch_size, device, rcfg.train.amp)
        return {**box_metrics(pred, rcfg.eval.iou_thresholds), **{f"mask/{k}": v for k, v in mask_metrics(pred).items()}}

    return train(
        model, train_set, rcfg, checkpoint_dir(cfg, method), method=method, evaluate=evaluate,
        select_metric=model.select_metric if weak else "acc@0.5",
        on_epoch_end=on_epoch_end, data_version=data_version,
        extra_state={"model_name": mcfg.model, "language_blind": mcfg.language_blind,
                     "vocab_size": manifest["vocab_size"], "pad_token_id": manifest["pad_token_id"]},
    )


def open_split(cfg: Config, model_name: str, split: str, language_blind: bool = False, training: bool = False):
    """A prepared split with what the model needs from the data: target masks to train a mask method on
    (evaluation scores against the original-resolution masks instead), candidates for a ranking method.
    A weakly supervised model trains on image-sentence pairs only (refvg.data.weak.WeakSplit: no box, mask,
    annotation id or candidate); its evaluation splits are like every method's."""
    from refvg.data.dataset import PreparedSplit
    from refvg.data.prepare import prepared_path
    from refvg.data.proposals import load_candidates
    from refvg.data.weak import WeakSplit
    from refvg.models import model_needs
    from refvg.models.registry import is_weakly_supervised

    needs = model_needs(model_name, cfg)
    prepared = prepared_path(cfg)
    if training and is_weakly_supervised(model_name):
        return WeakSplit(PreparedSplit(prepared, split, language_blind=language_blind))
    candidates = None
    if "candidates" in needs:
        candidates = load_candidates(cfg.proposals, prepared / split, instances_path(cfg))
    return PreparedSplit(prepared, split, language_blind=language_blind, masks=training and "masks" in needs,
                         candidates=candidates, max_candidates=cfg.proposals.max_candidates,
                         match_iou=cfg.proposals.match_iou)


def eval_splits(ecfg, manifest: dict) -> list[str]:
    """`eval.splits`, or every prepared split but train. A split named there that was not prepared is an
    error: a results table silently missing a split reads as if it were complete."""
    prepared = list(manifest["splits"])
    if ecfg.splits is None:
        return [s for s in prepared if s != "train"]
    missing = [s for s in ecfg.splits if s not in prepared]
    if missing:
        raise ValueError(f"eval.splits names {missing}, which prepare did not write (prepared: {prepared}); "
                         "add them to data.splits or drop them from eval.splits")
    return list(ecfg.splits)


def instances_path(cfg: Config) -> Path:
    """The dataset's COCO instances file (what a detections file is read against)."""
    return Path(cfg.data.root) / cfg.data.dataset / "instances.json"


def teacher_dir(cfg: Config) -> Path:
    return Path(cfg.teacher.out_dir)


def with_teacher_features(cfg: Config, method: str, train_set, prepared: Path):
    """(the train split with the `teacher` stage's cached features in every item, their identity). Only
    methods of `distill_methods` may use them: the others' DVC stages do not depend on the teacher."""
    from refvg.config import ConfigError
    from refvg.data.teacher_features import FEATURES_DIR, WithTeacherFeatures

    if method not in cfg.distill_methods:
        raise ConfigError(f"method {method!r} distils from the teacher: declare it under distill_methods (not "
                          f"methods), so that its DVC stage depends on the `teacher` stage's outputs")
    rcfg = cfg.for_method(method)
    data = WithTeacherFeatures(train_set, teacher_dir(rcfg) / FEATURES_DIR, prepared, dim=rcfg.teacher.projection_dim)
    return data, data.meta["features_id"]


def teacher(cfg: Config, on_epoch_end: Callable[[dict, int], None] = lambda m, e: None) -> dict:
    """The `teacher` stage: a pretrained CLIP (teacher.pretrained) or a small one trained
    contrastively on its own caption corpus (refvg.data.captions; never on the grounding splits),
    scored on that corpus's held-out images ("corpus") and by expression -> object retrieval on val
    ("val"); saved (model/, with its tokenizer) and its features of the grounding train split cached
    (features/) for the distilling students. Written to a temporary sibling and renamed at the end:
    an interrupted run leaves no half-written teacher."""
    from refvg.data import captions
    from refvg.data.dataset import PreparedSplit, read_manifest
    from refvg.data.prepare import prepared_path
    from refvg.data.teacher_features import (
        FEATURES_DIR, MODEL_DIR, data_fingerprint, write_features, write_manifest,
    )
    from refvg.data.text import load_tokenizer
    from refvg.engine.distributed import env_rank
    from refvg.engine.runtime import resolve_device, seed_everything
    from refvg.models import clip_teacher as ct

    t0 = time.perf_counter()
    if not cfg.distill_methods:  # DVC runs every stage; without a student a teacher is wasted time
        return _no_teacher(cfg, t0)
    tcfg = cfg.teacher
    prepared = prepared_path(cfg)
    manifest = read_manifest(prepared)
    device = resolve_device(cfg.train.device)
    seed_everything(tcfg.seed)
    corpus_figures: dict = {}
    if tcfg.pretrained:  # its own tokenizer: our prepared ids mean nothing to its embeddings
        tokenizer = load_tokenizer(tcfg.pretrained)
        model = ct.load_teacher(tcfg.pretrained, tcfg.projection_dim).to(device)
        length = min(tcfg.max_text_tokens, model.config.text_config.max_position_embeddings)
        view = lambda split: ct.TeacherView(PreparedSplit(prepared, split), tokenizer, length)  # noqa: E731
    else:
        tokenizer = load_tokenizer(prepared / TOKENIZER_DIR)
        corpus = captions.build_corpus(cfg.synthetic, tcfg.corpus_images, tcfg.captions_per_image,
                                       manifest["image_size"], tcfg.seed)
        shared = captions.shared_with_prepared(corpus, prepared)
        if shared:  # another stream cannot repeat a scene; a blank image (all padding) could
            raise RuntimeError(f"teacher caption corpus: {shared} of its images have the pixels of "
                               f"a grounding image in {prepared}; the teacher must learn from "
                               f"others")
        length = captions.caption_tokens(tokenizer, corpus)
        model = ct.build_teacher(tcfg, manifest["image_size"], max(manifest["max_tokens"], length),
                                 tokenizer).to(device)
        split_at = len(corpus) - tcfg.corpus_held_out
        train_pairs = captions.CorpusPairs(captions.subset(corpus, 0, split_at), tokenizer, length)
        held_out = captions.CorpusPairs(captions.subset(corpus, split_at), tokenizer, length)
        corpus_figures = {"images": split_at, "held_out_images": tcfg.corpus_held_out,
                          "caption_tokens": length, "images_shared_with_grounding": shared}
        view = lambda split: ct.TeacherView(PreparedSplit(prepared, split))  # noqa: E731
    train_view = view("train")
    val_view = view("val") if "val" in manifest["splits"] else None

    def evaluate(m) -> dict:
        out = {}
        if not tcfg.pretrained:
            own = ct.caption_retrieval_recall(m, held_out, tcfg.batch_size, device)
            out |= {f"corpus/{k}": v for k, v in own.items()}
        if val_view is not None:
            val = ct.crop_retrieval_recall(m, val_view, tcfg.batch_size, device)
            out |= {f"val/{k}": v for k, v in val.items()}
        return out

    out = teacher_dir(cfg)
    history = []
    if not tcfg.pretrained:
        history = ct.train_teacher(model, train_pairs, cfg, out / ct.TRAINING_DIR, evaluate, on_epoch_end,
                                   data_fingerprint(prepared)).history
    if env_rank() != 0:  # under torchrun the other ranks share the training; rank 0 writes the teacher
        return {"out_dir": str(out), "features": {}, "val": {}, "corpus": {}, "history": history,
                "seconds": time.perf_counter() - t0}
    scores = evaluate(model)
    recall = {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("val/")}
    corpus_figures |= {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("corpus/")}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ct.save_teacher(model, tokenizer, tmp / MODEL_DIR)
        patch, sentence = ct.extract_features(model, train_view, tcfg.batch_size, device)
        write_features(tmp / FEATURES_DIR, "train", patch, sentence)
        fingerprint = data_fingerprint(prepared)
        meta = {"data_fingerprint": fingerprint, "prepared": str(prepared),
                "features_id": _digest(fingerprint.encode(), patch.tobytes(), sentence.tobytes()),
                "splits": {"train": {"images": int(patch.shape[0]), "samples": int(sentence.shape[0])}},
                "grid": int(round(patch.shape[1] ** 0.5)), "dim": int(patch.shape[2]),
                "teacher": ct.teacher_config_summary(cfg, model), "val": recall,
                "corpus": corpus_figures}
        write_manifest(tmp / FEATURES_DIR, meta)
        if not tcfg.pretrained and (out / ct.TRAINING_DIR).exists():  # kept: a rerun of this run finds it done
            shutil.move(out / ct.TRAINING_DIR, tmp / ct.TRAINING_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return {"out_dir": str(out), "features": meta, "val": recall, "corpus": corpus_figures,
            "history": history, "seconds": time.perf_counter() - t0}


def _no_teacher(cfg: Config, t0: float) -> dict:
    """The `teacher` stage's outputs when no method distils: a manifest that says so (DVC wants the outputs)."""
    from refvg.data.teacher_features import FEATURES_DIR, write_manifest

    out = teacher_dir(cfg)
    shutil.rmtree(out, ignore_errors=True)
    meta = {"skipped": "no method in distill_methods: no teacher trained"}
    write_manifest(out / FEATURES_DIR, meta)
    return {"out_dir": str(out), "features": meta, "val": {}, "corpus": {}, "history": [],
            "seconds": time.perf_counter() - t0}


def _digest(*parts: bytes) -> str:
    import hashlib

    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


TRAINED_KEYS = ("model", "config", "model_name", "vocab_size", "pad_token_id", "language_blind", "best_epoch")


def load_trained(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """Rebuild a model from one of our checkpoints (its own config, not today's params.yaml)."""
    from refvg.engine.checkpoint import CheckpointError, load_checkpoint
    from refvg.models import build_model

    state = load_checkpoint(path, map_location=device, require=TRAINED_KEYS)
    try:
        cfg = _validate(state["config"], source="its config")
        model = build_model(state["model_name"], cfg, vocab_size=state["vocab_size"], pad_token_id=state["pad_token_id"])
        model.load_state_dict(state["model"])
    except (ValueError, TypeError, RuntimeError) as err:  # config of another version; weights that do not fit
        reason = " ".join(str(err).split())[:400]
        raise CheckpointError(f"{path}: cannot rebuild its {state['model_name']!r} model: {reason}") from None
    return model.to(device).eval(), cfg, state


@dataclass
class EvalReport:
    method: str
    metrics: dict  # split -> summary
    metrics_path: Path
    figures: list[Path] = field(default_factory=list)
    plot_data: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def evaluate_method(cfg: Config, method: str) -> EvalReport:
    from torch.utils.data import Subset

    from refvg.data.dataset import read_manifest
    from refvg.data.prepare import prepared_path
    from refvg.engine.evaluator import box_metrics, mask_metrics, predict_batches, predict_masks, predict_split
    from refvg.engine.runtime import resolve_device
    from refvg.engine.trainer import BEST
    from refvg.models.registry import is_weakly_supervised
    from refvg.visualize import plot_accuracy_vs_iou, plot_cams, plot_qualitative

    t0 = time.perf_counter()
    device = resolve_device(cfg.train.device)
    model, _, state = load_trained(checkpoint_dir(cfg, method) / BEST, device)
    rcfg = cfg.for_method(method)  # the data it is scored on: today's prepared split, its method's candidates
    prepared = prepared_path(cfg)
    manifest = read_manifest(prepared)
    ecfg = cfg.eval
    preds, metrics = [], {}
    for split in eval_splits(ecfg, manifest):
        ds = open_split(rcfg, state["model_name"], split, state["language_blind"])
        p = predict_split(model, ds, ecfg.batch_size, device, cfg.train.amp)
        preds.append(p)
        metrics[split] = box_metrics(p, ecfg.iou_thresholds)
        if p.has_masks:  # mask methods: oIoU / mIoU / prec@k next to the Acc@IoU of their mask's tight box
            metrics[split]["mask"] = mask_metrics(p)
        if ds.candidates is not None:  # ranking methods: how often the target was among the candidates at all
            metrics[split]["candidates"] = candidate_metrics(ds)
    payload = {
        "method": method, "model": state["model_name"], "language_blind": state["language_blind"],
        "best_epoch": state["best_epoch"], "dataset": manifest["dataset"], "splits": metrics,
        "supervision": "weak" if is_weakly_supervised(state["model_name"]) else "full",
    }
    if any("candidates" in m for m in metrics.values()):
        payload["proposals"] = rcfg.proposals.model_dump(mode="json")
    metrics_path = Path(ecfg.metrics_dir) / f"{method}.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(payload, indent=2) + "\n")

    plots = Path(ecfg.plots_dir) / method
    plots.mkdir(parents=True, exist_ok=True)
    curve = plots / "acc_vs_iou.json"
    curve.write_text(json.dumps([
        {"split": p.split, "threshold": t, "accuracy": a}
        for p in preds for t, a in _acc_curve(p.ious, ecfg.iou_thresholds).items()
    ], indent=1))
    figures = [plots / "acc_vs_iou.png", plots / "qualitative.png"]
    plot_accuracy_vs_iou(preds, ecfg.iou_thresholds, f"{method} on {manifest['dataset']}", figures[0])
    val = next((p for p in preds if p.split == "val"), preds[0])
    ds = open_split(rcfg, state["model_name"], val.split, state["language_blind"])  # as the model saw it
    pick = np.random.default_rng(0).permutation(len(ds))[: ecfg.num_qualitative]
    scale = np.array([[ds.letterboxes[i].scale] for i in pick])
    crops = [np.asarray(ds.images[ds.records[i]["image_index"]])[: ds.letterboxes[i].content_h, : ds.letterboxes[i].content_w]
             for i in pick]
    overlays = {}
    if val.has_masks:
        overlays = {"pred_masks": predict_masks(model, ds, pick, ecfg.batch_size, device, cfg.train.amp),
                    "gt_masks": [ds.gt_mask(i) for i in pick],
                    "mask_ious": val.mask_inter[pick] / np.maximum(val.mask_union[pick], 1)}
    if hasattr(model, "explain"):  # ranking models: the same panels, with which words and regions decided
        _attention_figure(model, ds, pick, crops, val.ious[pick], device, checkpoint_dir(cfg, method) / TOKENIZER_DIR,
                          figures[1])
    else:
        plot_qualitative(crops, [ds.records[i]["sentence"] for i in pick], val.pred_xyxy[pick] * scale,
                         val.gt_xyxy[pick] * scale, val.ious[pick], figures[1], **overlays)
    if is_weakly_supervised(state["model_name"]):  # the Grad-CAM each box was read from, over its image
        cams = [c for out in predict_batches(model, Subset(ds, pick.tolist()), ecfg.batch_size, device,
                                             cfg.train.amp, keys=("cam",)) for c in out["cam"]]
        figures.append(plots / "cams.png")
        plot_cams(crops, [c[: crop.shape[0], : crop.shape[1]].numpy() for c, crop in zip(cams, crops)],
                  [ds.records[i]["sentence"] for i in pick], val.pred_xyxy[pick] * scale, val.gt_xyxy[pick] * scale,
                  figures[-1])
    return EvalReport(method, metrics, metrics_path, figures, [curve], time.perf_counter() - t0)


def candidate_metrics(ds) -> dict:
    """A ranking method's ceiling on a split: the fraction of samples whose target is among the candidates
    (a sample without it counts as a miss in acc@0.5), their count, and the mean number of candidates."""
    found = ds.candidates["cand_target"] >= 0
    return {"target_recall": float(found.float().mean()) if len(found) else 0.0, "misses": int((~found).sum()),
            "mean_candidates": float(ds.candidates["cand_valid"].sum(1).float().mean()) if len(found) else 0.0}


def _attention_figure(model, ds, pick, crops, ious, device, tokenizer_dir: Path, path: Path) -> None:
    """The qualitative figure of a ranking model (`explain`): chosen box, target, the word attention, the
    module weights, the most attended sub-region and context object."""
    import torch

    from refvg.data.dataset import collate
    from refvg.data.text import load_tokenizer
    from refvg.data.transforms import cxcywh_to_xyxy
    from refvg.engine.runtime import to_device
    from refvg.visualize import plot_attention

    if len(pick) == 0:
        return
    batch = collate([ds[int(i)] for i in pick])
    ex = {k: v.cpu() for k, v in model.explain(to_device(batch, device)).items()}
    tok = load_tokenizer(tokenizer_dir)
    words = []
    for ids, mask, att in zip(batch["input_ids"], batch["attention_mask"], ex["word_attention"]):
        n = int(mask.sum())
        words.append([(tok.convert_ids_to_tokens(int(t)), float(a)) for t, a in zip(ids[1:n - 1], att[1:n - 1])])
    size = ds.size
    rows = torch.arange(len(pick))
    chosen = cxcywh_to_xyxy(batch["cand_boxes"][rows, ex["best"]]).numpy() * size
    context = cxcywh_to_xyxy(batch["cand_boxes"][rows, ex["context"].clamp_min(0)]).numpy() * size
    context[ex["context"].numpy() < 0] = np.nan
    target = cxcywh_to_xyxy(batch["box"]).numpy() * size
    plot_attention(crops, words, ex["module_weights"].numpy(), chosen, ex["cell_box"].numpy() * size, context, target,
                   ious, path)


def _acc_curve(ious: np.ndarray, thresholds) -> dict:
    from refvg.metrics import accuracy_at_iou

    return {float(t): float(a) for t, a in accuracy_at_iou(ious, thresholds).items()}


def report(cfg: Config, out_dir: Path = Path("reports")) -> Path:
    """reports/summary.md: one row per method of params.yaml, Acc@0.5 per split, from metrics/<method>.json."""
    from refvg.reporting import write_summary

    return write_summary(cfg, out_dir)
