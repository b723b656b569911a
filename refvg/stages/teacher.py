"""The `teacher` stage: the CLIP teacher of the distilling methods and its cached features."""

from __future__ import annotations

import shutil
import time
from typing import Callable

from refvg.config import Config
from refvg.data.text import TOKENIZER_DIR
from refvg.stages.paths import teacher_dir, written_whole


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
        FEATURES_DIR,
        MODEL_DIR,
        data_fingerprint,
        write_features,
        write_manifest,
    )
    from refvg.data.text import load_tokenizer
    from refvg.engine.distributed import env_rank
    from refvg.engine.runtime import resolve_device, seed_everything
    from refvg.engine import teacher as tt
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
        view = lambda split: tt.TeacherView(PreparedSplit(prepared, split), tokenizer, length)  # noqa: E731
    else:
        tokenizer = load_tokenizer(prepared / TOKENIZER_DIR)
        corpus = captions.build_corpus(
            cfg.synthetic,
            tcfg.corpus_images,
            tcfg.captions_per_image,
            manifest["image_size"],
            tcfg.seed,
        )
        shared = captions.shared_with_prepared(corpus, prepared)
        if shared:  # another stream cannot repeat a scene; a blank image (all padding) could
            raise RuntimeError(
                f"teacher caption corpus: {shared} of its images have the pixels of "
                f"a grounding image in {prepared}; the teacher must learn from "
                f"others"
            )
        length = captions.caption_tokens(tokenizer, corpus)
        model = ct.build_teacher(
            tcfg, manifest["image_size"], max(manifest["max_tokens"], length), tokenizer
        ).to(device)
        split_at = len(corpus) - tcfg.corpus_held_out
        train_pairs = captions.CorpusPairs(captions.subset(corpus, 0, split_at), tokenizer, length)
        held_out = captions.CorpusPairs(captions.subset(corpus, split_at), tokenizer, length)
        corpus_figures = {
            "images": split_at,
            "held_out_images": tcfg.corpus_held_out,
            "caption_tokens": length,
            "images_shared_with_grounding": shared,
        }
        view = lambda split: tt.TeacherView(PreparedSplit(prepared, split))  # noqa: E731
    train_view = view("train")
    val_view = view("val") if "val" in manifest["splits"] else None

    def evaluate(m) -> dict:
        out = {}
        if not tcfg.pretrained:
            own = tt.caption_retrieval_recall(m, held_out, tcfg.batch_size, device)
            out |= {f"corpus/{k}": v for k, v in own.items()}
        if val_view is not None:
            val = tt.crop_retrieval_recall(m, val_view, tcfg.batch_size, device)
            out |= {f"val/{k}": v for k, v in val.items()}
        return out

    out = teacher_dir(cfg)
    history = []
    if not tcfg.pretrained:
        history = tt.train_teacher(
            model,
            train_pairs,
            cfg,
            out / tt.TRAINING_DIR,
            evaluate,
            on_epoch_end,
            data_fingerprint(prepared),
        ).history
    if (
        env_rank() != 0
    ):  # under torchrun the other ranks share the training; rank 0 writes the teacher
        return {
            "out_dir": str(out),
            "features": {},
            "val": {},
            "corpus": {},
            "history": history,
            "seconds": time.perf_counter() - t0,
        }
    scores = evaluate(model)
    recall = {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("val/")}
    corpus_figures |= {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("corpus/")}
    with written_whole(out) as tmp:
        ct.save_teacher(model, tokenizer, tmp / MODEL_DIR)
        patch, sentence = tt.extract_features(model, train_view, tcfg.batch_size, device)
        write_features(tmp / FEATURES_DIR, "train", patch, sentence)
        fingerprint = data_fingerprint(prepared)
        meta = {
            "data_fingerprint": fingerprint,
            "prepared": str(prepared),
            "features_id": _digest(fingerprint.encode(), patch.tobytes(), sentence.tobytes()),
            "splits": {"train": {"images": int(patch.shape[0]), "samples": int(sentence.shape[0])}},
            "grid": int(round(patch.shape[1] ** 0.5)),
            "dim": int(patch.shape[2]),
            "teacher": tt.teacher_config_summary(cfg, model),
            "val": recall,
            "corpus": corpus_figures,
        }
        write_manifest(tmp / FEATURES_DIR, meta)
        if not tcfg.pretrained and (out / tt.TRAINING_DIR).exists():
            # kept: a rerun of this run finds it done
            shutil.move(out / tt.TRAINING_DIR, tmp / tt.TRAINING_DIR)
    return {
        "out_dir": str(out),
        "features": meta,
        "val": recall,
        "corpus": corpus_figures,
        "history": history,
        "seconds": time.perf_counter() - t0,
    }


def _no_teacher(cfg: Config, t0: float) -> dict:
    """The `teacher` stage's outputs when no method distils: a manifest that says so (DVC wants the
    outputs)."""
    from refvg.data.teacher_features import FEATURES_DIR, write_manifest

    out = teacher_dir(cfg)
    shutil.rmtree(out, ignore_errors=True)
    meta = {"skipped": "no method in distill_methods: no teacher trained"}
    write_manifest(out / FEATURES_DIR, meta)
    return {
        "out_dir": str(out),
        "features": meta,
        "val": {},
        "corpus": {},
        "history": [],
        "seconds": time.perf_counter() - t0,
    }


def _digest(*parts: bytes) -> str:
    import hashlib

    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]
