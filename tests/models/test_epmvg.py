"""EpmVG and its CLIP teacher: the distillation losses (zero when the student equals the teacher,
gradients to the student only), the teacher's shapes, crops and retrieval recall, the
pretrained-by-folder path, and the clear failures without the teacher's features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refvg import stages
from refvg.config import Config, ConfigError, load_config
from refvg.data.text import build_wordpiece_tokenizer, encode, load_tokenizer
from refvg.losses import distillation_losses, feature_consistency_loss, similarity_structure_loss
from refvg.engine import teacher as tt
from refvg.models import build_model, clip_teacher as ct
from refvg.models.epmvg import resample_tokens
from tests.helpers import PAD, SMALL_TEACHER, VOCAB, make_batch, write_params

EPMVG = {"epmvg": {"model": "epmvg"}}


def student_and_teacher_features(b=4, n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens, sentence = torch.randn(b, n, d, generator=g), torch.randn(b, d, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[:, -4:] = False  # letterbox padding
    return tokens, sentence, valid


def test_distillation_losses_are_zero_when_the_student_equals_the_teacher():
    tokens, sentence, valid = student_and_teacher_features()
    same = distillation_losses(
        tokens, sentence, tokens.clone(), sentence.clone(), valid, temperature=0.1
    )
    for name, value in same.items():
        assert abs(float(value)) < 1e-5, name
    other_tokens, other_sentence, _ = student_and_teacher_features(seed=1)
    differ = distillation_losses(
        other_tokens, other_sentence, tokens, sentence, valid, temperature=0.1
    )
    assert all(float(v) > 1e-2 for v in differ.values()), differ


def test_feature_loss_ignores_padding_and_similarity_loss_sees_only_structure():
    tokens, sentence, valid = student_and_teacher_features()
    noisy = tokens.clone()
    noisy[~valid] = torch.randn(int((~valid).sum()), tokens.shape[-1])  # only padding cells differ
    assert float(feature_consistency_loss(noisy, tokens, valid)) < 1e-6
    assert float(feature_consistency_loss(noisy, tokens)) > 1e-2
    # A rotated copy relates images to texts exactly as the teacher does: no structure loss, but
    # feature loss.
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))[0]
    image, text = tokens.mean(1), sentence
    assert (
        float(similarity_structure_loss(image @ rotation, text @ rotation, image, text, 0.1)) < 1e-5
    )
    assert float(feature_consistency_loss(text @ rotation, text)) > 1e-2


def make_epmvg(**epmvg) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Config.model_validate(
        {
            "model": {
                "visual": {"hidden_sizes": [16, 32, 64]},
                "text": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64},
                "fusion": {"d_model": 64, "num_layers": 1, "num_heads": 2, "ffn_dim": 128},
            },
            "method": {"model": "epmvg", "config": epmvg},
            "teacher": SMALL_TEACHER,
        }
    )
    return build_model("epmvg", cfg, VOCAB, PAD)


def test_gradients_reach_the_student_and_never_the_teacher():
    student = make_epmvg()
    tokenizer = build_wordpiece_tokenizer(["the red circle", "the blue square left of it"], 60)
    teacher = ct.build_teacher(Config(teacher=SMALL_TEACHER).teacher, 64, 12, tokenizer)
    batch = make_batch()
    images = (batch["image"].permute(0, 2, 3, 1) * 40 + 128).clamp(0, 255).to(torch.uint8)
    ids, mask = (
        torch.from_numpy(a.astype(np.int64)) for a in encode(tokenizer, ["the red circle"] * 4, 12)
    )
    # Teacher features computed WITH autograd on: only the loss's own detaching keeps the teacher
    # out.
    batch["teacher_patch"] = ct.encode_images(teacher, ct.teacher_pixels(images, 64))[1]
    batch["teacher_sentence"] = ct.encode_texts(teacher, ids, mask)
    assert batch["teacher_patch"].shape == (4, 64, 16) and batch["teacher_patch"].requires_grad
    losses = student.compute_loss(student(batch), batch)
    assert {"distill_image", "distill_text", "distill_similarity"} <= set(losses)
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    for name in (
        "distill_visual.weight",
        "distill_text.weight",
        "visual.body.embedder.embedder.convolution.weight",
        "text.body.embeddings.word_embeddings.weight",
    ):
        grad = dict(student.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Distillation alone moves the backbones too (not only the heads).
    student.zero_grad()
    d = student.compute_loss(student(batch), batch)
    (d["distill_image"] + d["distill_text"] + d["distill_similarity"]).backward()
    assert student.visual.body.embedder.embedder.convolution.weight.grad.abs().sum() > 0


def test_method_and_ablation_start_from_the_same_weights_and_split_the_loss():
    """The distilling student and its control differ in the distillation alone: every weight they
    share starts equal (the projection heads draw from a forked RNG), and the distillation is
    reported as the auxiliary term the trainer clips apart from the grounding loss."""
    on, off = make_epmvg(), make_epmvg(image_weight=0, text_weight=0, similarity_weight=0)
    plain = dict(off.named_parameters())
    shared = {k: p for k, p in on.named_parameters() if not k.startswith("distill_")}
    assert shared.keys() == plain.keys()
    for name, p in shared.items():
        torch.testing.assert_close(p, plain[name], rtol=0, atol=0, msg=name)
    assert on.auxiliary_loss and not off.auxiliary_loss
    batch = make_batch()
    batch["teacher_patch"], batch["teacher_sentence"] = torch.randn(4, 64, 16), torch.randn(4, 16)
    losses, control = on.compute_loss(on(batch), batch), off.compute_loss(off(batch), batch)
    torch.testing.assert_close(losses["loss"] - losses["auxiliary"], control["loss"])
    assert "auxiliary" not in control


def test_no_distillation_means_no_heads_and_no_teacher():
    from refvg.models import model_needs

    plain = make_epmvg(image_weight=0, text_weight=0, similarity_weight=0)
    assert plain.distill_visual is None
    batch = make_batch()  # no teacher features in the batch: not needed
    losses = plain.compute_loss(plain(batch), batch)
    assert "distill_image" not in losses and torch.isfinite(losses["loss"])
    assert model_needs("epmvg", Config()) == {"teacher"}
    off = Config.model_validate(
        {
            "method": {
                "model": "epmvg",
                "config": {"image_weight": 0, "text_weight": 0, "similarity_weight": 0},
            }
        }
    )
    assert model_needs("epmvg", off) == set()
    with pytest.raises(KeyError, match="teacher"):
        distilling = make_epmvg()
        distilling.compute_loss(distilling(batch), batch)


def test_resample_tokens_averages_onto_a_coarser_grid():
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float).view(2, 16, 3)  # a 4x4 grid
    coarse = resample_tokens(tokens, (4, 4), (2, 2))
    grid = tokens.view(2, 4, 4, 3)
    torch.testing.assert_close(coarse[:, 0], grid[:, :2, :2].mean((1, 2)))
    torch.testing.assert_close(coarse[:, 3], grid[:, 2:, 2:].mean((1, 2)))
    assert resample_tokens(tokens, (4, 4), (8, 8)).shape == (2, 64, 3)


def test_retrieval_recall_hand_case():
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # right item (0) first
            [0.8, 0.5, 0.7],  # right item (1) third
            [0.2, 0.6, 0.6],
        ]
    )  # right item (2) tied for first: a tie counts against
    correct = torch.tensor([0, 1, 2])
    assert tt.retrieval_recall(similarity, correct, (1, 2, 3)) == pytest.approx(
        {"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 1.0}
    )


def test_teacher_shapes_and_crops():
    tokenizer = build_wordpiece_tokenizer(["the red circle", "the blue square"], 60)
    teacher = ct.build_teacher(Config(teacher=SMALL_TEACHER).teacher, 64, 12, tokenizer)
    images = torch.randint(0, 255, (3, 64, 64, 3), dtype=torch.uint8)
    pixels = ct.teacher_pixels(images, 64)
    image, patches = ct.encode_images(teacher, pixels)
    assert image.shape == (3, 16) and patches.shape == (3, 64, 16)  # 8x8 patches of 8 px
    ids, mask = (
        torch.from_numpy(a.astype(np.int64))
        for a in encode(tokenizer, ["the red circle", "red", "the blue square"], 12)
    )
    assert ct.encode_texts(teacher, ids, mask).shape == (3, 16)
    whole = ct.crop_boxes(pixels, torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 3), 64)
    torch.testing.assert_close(whole, pixels, atol=1e-4, rtol=0)  # the full box is the image
    quarter = ct.crop_boxes(pixels, torch.tensor([[0.25, 0.25, 0.5, 0.5]] * 3), 32)
    torch.testing.assert_close(quarter, pixels[..., :32, :32], atol=1e-4, rtol=0)
    assert ct.teacher_pixels(images, 32).shape == (
        3,
        3,
        32,
        32,
    )  # a pretrained teacher's own input size


def test_pretrained_teacher_loads_by_folder_with_its_own_tokenizer(in_tiny, tmp_path):
    """A CLIP saved with save_pretrained, named by its folder: used as is (not trained), and the
    expressions are tokenized by ITS tokenizer, not by the prepared one."""
    cfg = load_config(write_params(in_tiny, teacher=SMALL_TEACHER))
    prepared = Path(cfg.data.prepared_dir) / cfg.data.dataset
    records = json.loads((prepared / "train" / "samples.json").read_text())
    own = build_wordpiece_tokenizer(
        [r["sentence"][::-1] for r in records], 80
    )  # another vocabulary
    torch.manual_seed(1)
    saved = ct.build_teacher(
        cfg.teacher, 64, 24, own
    )  # 24 positions: expressions are cut to the model's length
    folder = tmp_path / "my-clip"
    ct.save_teacher(saved, own, folder)

    cfg = load_config(
        write_params(
            in_tiny, teacher={**SMALL_TEACHER, "pretrained": str(folder)}, distill_methods=EPMVG
        )
    )
    epochs = []
    result = stages.teacher(cfg, on_epoch_end=lambda m, e: epochs.append(e))
    assert result["history"] == [] and epochs == []  # used as is
    out = Path(result["out_dir"])
    loaded = ct.load_teacher(str(out / "model"), 16)
    for (name, a), b in zip(saved.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    meta = json.loads((out / "features" / "manifest.json").read_text())
    assert meta["teacher"]["pretrained"] == str(folder) and meta["dim"] == 16
    sentence = np.load(out / "features" / "train_sentence.npy").astype(np.float32)
    ids, mask = (
        torch.from_numpy(a.astype(np.int64))
        for a in encode(own, [r["sentence"] for r in records[:5]], 24)
    )
    with torch.no_grad():
        expected = ct.encode_texts(saved.eval(), ids, mask).numpy()
    np.testing.assert_allclose(sentence[:5], expected, atol=2e-3, rtol=1e-2)  # float16 cache
    prepared_ids = np.load(prepared / "train" / "tokens.npy")[:5, 0]
    assert not np.array_equal(ids[:, :20].numpy(), prepared_ids[:, :20])  # really another tokenizer
    assert load_tokenizer(out / "model").get_vocab() == own.get_vocab()
    with pytest.raises(ValueError, match="projection_dim: 16"):
        ct.load_teacher(str(folder), 512)


def test_epmvg_without_the_teacher_names_the_stage(in_tiny):
    from refvg.data.teacher_features import TeacherFeaturesError, read_manifest

    cfg = load_config(
        write_params(in_tiny, methods={}, distill_methods=EPMVG, teacher=SMALL_TEACHER)
    )
    with pytest.raises(TeacherFeaturesError, match=r"run the `teacher` stage"):
        stages.train_method(cfg, "epmvg")
    # In `methods` its DVC stage would not depend on the teacher: refused, with where it belongs.
    wrong = load_config(write_params(in_tiny, methods=EPMVG, teacher=SMALL_TEACHER))
    with pytest.raises(ConfigError, match="distill_methods"):
        stages.train_method(wrong, "epmvg")
    # No method distils: the stage writes only a manifest that says so, and a student is told what
    # to do.
    skipped = stages.teacher(wrong)
    assert skipped["history"] == [] and not (Path(cfg.teacher.out_dir) / "model").exists()
    with pytest.raises(TeacherFeaturesError, match="distill_methods"):
        stages.train_method(cfg, "epmvg")
    # Features of other prepared data are refused too.
    stages.teacher(cfg)
    manifest = Path(cfg.teacher.out_dir) / "features" / "manifest.json"
    meta = read_manifest(manifest.parent)
    manifest.write_text(json.dumps({**meta, "data_fingerprint": "0" * 16}))
    with pytest.raises(TeacherFeaturesError, match="other prepared data"):
        stages.train_method(cfg, "epmvg")


def test_the_teachers_corpus_is_its_own_scenes_with_captions_and_no_box(in_tiny, monkeypatch):
    """The small teacher learns from image-caption pairs outside the grounding data: scenes from
    another random stream (no image of any grounding split, not even identical pixels, even with the
    grounding data's own seed), captions naming every object of the scene, and no box anywhere it is
    given."""
    import dataclasses

    from refvg.data import captions
    from refvg.data.synthetic import random_scene

    cfg = load_config(write_params(in_tiny, teacher=SMALL_TEACHER, distill_methods=EPMVG))
    prepared = Path(cfg.data.prepared_dir) / cfg.data.dataset
    assert cfg.teacher.seed == cfg.synthetic.seed  # one seed: the stream is what keeps them apart
    corpus = captions.build_corpus(cfg.synthetic, 40, 2, cfg.data.image_size, cfg.teacher.seed)
    assert {f.name for f in dataclasses.fields(corpus)} == {"images", "captions"}
    assert captions.shared_with_prepared(corpus, prepared) == 0
    again = captions.build_corpus(cfg.synthetic, 40, 2, cfg.data.image_size, cfg.teacher.seed)
    assert np.array_equal(again.images, corpus.images) and again.captions == corpus.captions
    # The check can fail: a grounding image slipped into the corpus is found.
    leaked = captions.CaptionCorpus(corpus.images.copy(), corpus.captions)
    leaked.images[3] = np.load(prepared / "val" / "images.npy")[0]
    assert captions.shared_with_prepared(leaked, prepared) == 1
    # A caption names every object of its scene (colour and shape), in the prepared vocabulary's
    # words.
    image, objs = random_scene(cfg.synthetic, np.random.default_rng(5))
    text = captions.scene_caption(objs, image.width, image.height, np.random.default_rng(6))
    assert all(f"{o.colour} {o.shape}" in text for o in objs) and text.count("the ") == len(objs)
    tokenizer = load_tokenizer(prepared / "tokenizer")
    words = " ".join(c for caps in corpus.captions for c in caps)
    assert tokenizer.unk_token not in tokenizer.tokenize(words)

    seen = {}

    def spy(model, pairs, *args):
        seen["pairs"] = pairs
        return train(model, pairs, *args)

    train = tt.train_teacher
    monkeypatch.setattr(tt, "train_teacher", spy)
    result = stages.teacher(cfg)
    pairs = seen["pairs"]
    assert isinstance(pairs, captions.CorpusPairs) and len(pairs) == 48 - 16
    assert "box" not in pairs.batch(torch.arange(4))
    arrays = [np.load(p) for p in prepared.glob("*/images.npy")]
    grounding = set().union(*(captions.image_digests(a) for a in arrays))
    assert not captions.image_digests(pairs.images.numpy()) & grounding
    assert result["corpus"]["images_shared_with_grounding"] == 0
    assert result["corpus"]["chance@1"] == pytest.approx(1 / 16)
    assert {"text_recall@1", "image_recall@1"} <= set(result["corpus"])
    meta = json.loads((Path(result["out_dir"]) / "features" / "manifest.json").read_text())
    assert meta["corpus"]["held_out_images"] == 16
