"""The `pretrain` stage: the small backbones and text encoder every method's `pretrained:` points
at.

Stands in for microsoft/resnet-50, a Swin or bert-base-uncased where no hub can be reached, and
takes the same code path: folders written with save_pretrained, loaded with from_pretrained (and the
text folder's tokenizer is the one `prepare` tokenises with). What each learns from:
refvg.data.pretrain_corpus (scenes of their own random stream, never the grounding splits).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from refvg.config import Config
from refvg.stages.paths import written_whole

METRICS_FILE = "metrics.json"


def pretrain(cfg: Config, on_epoch_end: Callable[[dict, int], None] = lambda m, e: None) -> dict:
    """Train `pretrain.models` on the pretrain corpus, score each on its held-out images ("mAP" of
    the backbones' labels vs a constant prior, "masked_acc" of the text encoder vs the most frequent
    word) and save them to <out_dir>/<model>. Written to a temporary sibling and renamed at the end:
    an interrupted run leaves no half-written folder."""
    from refvg.data.pretrain_corpus import build_pretrain_corpus

    t0 = time.perf_counter()
    pcfg = cfg.pretrain
    out = Path(pcfg.out_dir)
    corpus = build_pretrain_corpus(
        cfg.synthetic,
        pcfg.corpus_images,
        cfg.data.image_size,
        pcfg.seed,
        pcfg.expressions_per_object,
    )
    train_part, held_out = corpus.split(pcfg.held_out)
    metrics: dict = {"corpus_seconds": time.perf_counter() - t0}
    with written_whole(out) as tmp:
        for kind in ("resnet", "swin"):
            if kind in pcfg.models:
                metrics[kind] = _pretrain_visual(cfg, kind, train_part, held_out, tmp, on_epoch_end)
        if "text" in pcfg.models:
            metrics["text"] = _pretrain_text(cfg, train_part, held_out, tmp, on_epoch_end)
        metrics["seconds"] = time.perf_counter() - t0
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return {**metrics, "out_dir": str(out)}


def _fit(model, n: int, loss_of, pcfg, report) -> None:
    """`pcfg.epochs` epochs of AdamW over `n` samples in seeded random batches; `loss_of(rows,
    generator)` is a batch's loss (the generator also draws a batch's MLM masking); `report(mean
    loss, epoch)` after each epoch."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=pcfg.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(pcfg.seed)
    for epoch in range(pcfg.epochs):
        model.train()
        total, steps = 0.0, 0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, pcfg.batch_size):
            loss = loss_of(order[start : start + pcfg.batch_size], generator)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        report(total / steps, epoch)


def _pretrain_visual(cfg: Config, kind: str, train_part, held_out, out: Path, on_epoch_end) -> dict:
    import torch
    import torch.nn.functional as F

    from refvg.data.pretrain_corpus import LABELS
    from refvg.data.transforms import normalize_images
    from refvg.models.backbones import _resnet, _swin
    from refvg.models.pretrain_heads import SceneClassifier

    pcfg = cfg.pretrain
    torch.manual_seed(pcfg.seed)  # per model: choosing fewer models changes none of the others
    vcfg = cfg.model.visual.model_copy(update={"kind": kind, "pretrained": None})
    body = _resnet(vcfg) if kind == "resnet" else _swin(vcfg, cfg.data.image_size)
    model = SceneClassifier(body, len(LABELS))
    images, labels = torch.from_numpy(train_part.images), torch.from_numpy(train_part.labels)
    _fit(
        model,
        len(images),
        lambda rows, _: F.binary_cross_entropy_with_logits(
            model(normalize_images(images[rows])), labels[rows]
        ),
        pcfg,
        lambda loss, epoch: on_epoch_end({f"{kind}/train_bce": loss}, epoch),
    )
    model.eval()
    with torch.no_grad():
        scores = torch.cat(
            [
                model(normalize_images(torch.from_numpy(held_out.images[i : i + 256])))
                for i in range(0, len(held_out), 256)
            ]
        ).numpy()
    prior = np.broadcast_to(train_part.labels.mean(0), held_out.labels.shape)
    body.save_pretrained(str(out / kind))
    return {
        "mAP": mean_average_precision(scores, held_out.labels),
        "mAP_prior": mean_average_precision(prior, held_out.labels),
        "held_out_images": len(held_out),
    }


def _pretrain_text(cfg: Config, train_part, held_out, out: Path, on_epoch_end) -> dict:
    import torch
    from transformers import BertForMaskedLM

    from refvg.data.pretrain_corpus import mask_tokens
    from refvg.data.refshapes_language import vocabulary
    from refvg.models.backbones import bert_config
    from refvg.data.text import SPECIAL_TOKENS, build_wordpiece_tokenizer, encode

    pcfg, tcfg = cfg.pretrain, cfg.model.text
    train_texts = [t for texts in train_part.texts for t in texts]
    held_texts = [t for texts in held_out.texts for t in texts]
    # Every word of the grammar is a whole word of the vocabulary, drawn in the corpus or not (the
    # size cap is the whole list: model.text.vocab_size is the small from-scratch tokenizer's).
    tokenizer = build_wordpiece_tokenizer(train_texts + sorted(vocabulary()), vocab_size=1 << 20)
    # Training sequences (pcfg.text_context "caption": each expression followed by its scene's
    # caption, where a masked colour, size or place can be read); held out: single texts, as a
    # grounding expression arrives, whatever the training sequences.
    train_firsts, train_seconds = mlm_sequences(train_part.texts, pcfg.text_context == "caption")
    length = max(len(tokenizer(t)["input_ids"]) for t in train_texts + held_texts)
    train_length = max(
        [length]
        + [len(tokenizer(a, b)["input_ids"]) for a, b in zip(train_firsts, train_seconds) if b]
    )
    torch.manual_seed(pcfg.seed)
    model = BertForMaskedLM(
        bert_config(
            tcfg, len(tokenizer), tokenizer.pad_token_id, max(cfg.data.max_tokens, train_length)
        )
    )
    special = torch.tensor(tokenizer.all_special_ids)
    words = (len(SPECIAL_TOKENS), len(tokenizer))  # what a "random word" is drawn from

    def tensors(texts, seconds=None, size=length):
        if seconds is None or not any(seconds):
            ids, mask = encode(tokenizer, texts, size)
        else:  # one segment (no token types): the grounding inputs have one
            enc = [
                tokenizer(a, b, padding="max_length", max_length=size)
                if b
                else tokenizer(a, padding="max_length", max_length=size)
                for a, b in zip(texts, seconds)
            ]
            ids = np.array([e["input_ids"] for e in enc])
            mask = np.array([e["attention_mask"] for e in enc])
        ids, mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
        return ids, mask, (mask > 0) & ~torch.isin(ids, special)

    ids, mask, maskable = tensors(train_firsts, train_seconds, train_length)

    def mlm_loss(rows, generator):
        inputs, labels = mask_tokens(
            ids[rows],
            maskable[rows],
            tokenizer.mask_token_id,
            words,
            pcfg.mask_probability,
            generator,
        )
        return model(input_ids=inputs, attention_mask=mask[rows], labels=labels).loss

    _fit(
        model,
        len(ids),
        mlm_loss,
        pcfg,
        lambda loss, epoch: on_epoch_end({"text/train_mlm_loss": loss}, epoch),
    )
    # Held out: one fixed masking of its texts; the baseline always answers the commonest word.
    h_ids, h_mask, h_maskable = tensors(held_texts)
    fixed = torch.Generator().manual_seed(pcfg.seed + 1)
    inputs, labels = mask_tokens(
        h_ids, h_maskable, tokenizer.mask_token_id, words, pcfg.mask_probability, fixed
    )
    model.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [
                model(
                    input_ids=inputs[i : i + 256], attention_mask=h_mask[i : i + 256]
                ).logits.argmax(-1)
                for i in range(0, len(inputs), 256)
            ]
        )
    chosen = labels != -100
    commonest = torch.bincount(ids[maskable], minlength=len(tokenizer)).argmax()
    model.save_pretrained(str(out / "text"))
    tokenizer.save_pretrained(str(out / "text"))
    return {
        "masked_acc": (predicted[chosen] == labels[chosen]).float().mean().item(),
        "masked_acc_unigram": (labels[chosen] == commonest).float().mean().item(),
        "masked_tokens": int(chosen.sum()),
        "vocab_size": len(tokenizer),
    }


def mlm_sequences(
    texts_per_image: list[list[str]], caption_context: bool
) -> tuple[list[str], list[str | None]]:
    """(first texts, second texts or None): every text of every image; with `caption_context` each
    expression is followed by its image's caption (the last text), which names every object's size,
    colour, shape and place. Alone, "the red circle" gives MLM no clue to a masked colour (every
    colour fits), and the tied embeddings learn one "some colour" vector (docs/pretrain.md)."""
    firsts, seconds = [], []
    for texts in texts_per_image:
        for i, t in enumerate(texts):
            firsts.append(t)
            seconds.append(texts[-1] if caption_context and i < len(texts) - 1 else None)
    return firsts, seconds


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over labels with a positive of the average precision of ranking the images by score
    (ties in image order: a constant score gets about its label's positive rate)."""
    aps = []
    for s, y in zip(np.asarray(scores).T, np.asarray(labels).T):
        if y.sum() == 0:
            continue
        hits = y[np.argsort(-s, kind="stable")]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return float(np.mean(aps))
