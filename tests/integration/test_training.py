"""Prepare -> dataset -> train -> evaluate -> report through the library (no orchestration), on the
tiny set."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from refvg import stages
from refvg.config import load_config
from refvg.data.dataset import PreparedSplit, collate, read_manifest
from refvg.data.prepare import prepare_dataset, prepared_path
from refvg.data.refer import BadRecordError
from refvg.engine.checkpoint import CheckpointError, load_checkpoint, load_trained
from refvg.engine.trainer import BEST, LAST
from tests.helpers import write_params


def test_prepare_writes_manifest_arrays_and_tokenizer(in_tiny):
    cfg = load_config("params.yaml")
    prepared = prepared_path(cfg)
    manifest = read_manifest(prepared)
    assert set(manifest["splits"]) == {"train", "val", "testA", "testB"}
    assert manifest["skipped"]["total"] == 0
    assert (prepared / "tokenizer" / "tokenizer.json").exists()
    train = PreparedSplit(prepared, "train")
    assert len(train) == manifest["splits"]["train"]["samples"]
    assert train.images.shape[1:] == (64, 64, 3) and train.images.dtype == np.uint8
    assert ((train.boxes >= 0) & (train.boxes <= 1)).all()


def test_batch_contract_and_blind_control(in_tiny):
    prepared = prepared_path(load_config("params.yaml"))
    batch = collate([PreparedSplit(prepared, "train")[i] for i in range(4)])
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 64, 64, 3)
    assert batch["pixel_mask"].dtype == torch.bool and batch["box"].shape == (4, 4)
    assert (batch["attention_mask"].sum(1) > 2).all()  # real expressions
    blind = PreparedSplit(prepared, "train", language_blind=True)
    b = collate([blind[i] for i in range(4)])
    assert (b["attention_mask"].sum(1) == 2).all()  # [CLS] [SEP] only
    assert len(set(map(tuple, b["input_ids"].tolist()))) == 1  # every expression the same


def test_train_evaluate_report(in_tiny):
    cfg = load_config("params.yaml")
    epochs_seen = []
    result = stages.train_method(
        cfg, "transvg", on_epoch_end=lambda m, e: epochs_seen.append((e, m))
    )
    assert [e for e, _ in epochs_seen] == [1, 2] and result.best_checkpoint.exists()
    assert {"train/loss", "train/l1", "train/giou", "val/acc@0.5", "lr"} <= set(epochs_seen[0][1])
    assert np.isfinite(epochs_seen[-1][1]["train/loss"])
    ckpt = stages.checkpoint_dir(cfg, "transvg")
    assert (ckpt / BEST).exists() and (ckpt / LAST).exists() and (ckpt / "tokenizer").is_dir()

    rep = stages.evaluate_method(cfg, "transvg")
    payload = json.loads(rep.metrics_path.read_text())
    assert set(payload["splits"]) == {"val", "testA", "testB"}
    val = payload["splits"]["val"]
    assert (
        0 <= val["acc@0.5"] <= 1
        and val["n"] == read_manifest(prepared_path(cfg))["splits"]["val"]["samples"]
    )
    assert val["acc@0.5:0.95"] <= val["acc@0.5"]
    assert all(p.exists() and p.stat().st_size > 0 for p in rep.figures)
    summary = stages.report(cfg).read_text()
    assert "| transvg |" in summary and "Not evaluated yet: transvg_blind" in summary


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_loader_refuses_foreign_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": _Exploit()}))
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a refvg checkpoint"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)


def _copy_raw(tiny_workdir, dst):
    shutil.copytree(tiny_workdir / "data" / "raw", dst / "data" / "raw")


def test_prepare_counts_a_corrupt_image_or_names_it(tiny_workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _copy_raw(tiny_workdir, tmp_path)
    images = sorted((tmp_path / "data/raw/refshapes/images").iterdir())
    victim = images[0]
    victim.write_bytes(victim.read_bytes()[:60])  # truncated file
    cfg = load_config(write_params(tmp_path))
    manifest = prepare_dataset(cfg)
    assert manifest["skipped"]["counts"].get("corrupt_image", 0) >= 1
    assert any(victim.name in e for e in manifest["skipped"]["examples"])

    cfg = load_config(write_params(tmp_path, data={"image_size": 64, "on_bad_record": "error"}))
    with pytest.raises(BadRecordError, match=victim.name):
        prepare_dataset(cfg)
    assert not (tmp_path / "data/prepared/refshapes.tmp").exists()  # no half-prepared leftovers


def test_predict_on_a_raw_image(in_tiny):
    from refvg.engine.predict import Grounder

    cfg = load_config("params.yaml")
    stages.train_method(cfg, "transvg")
    rec = PreparedSplit(prepared_path(cfg), "val").records[0]
    image = Image.open(os.path.join(cfg.data.image_dir, rec["file_name"]))
    box = Grounder(stages.checkpoint_dir(cfg, "transvg") / BEST).predict(
        [image], [rec["sentence"]]
    )[0]
    assert (
        box.shape == (4,)
        and 0 <= box[0] <= box[2] <= image.width
        and 0 <= box[1] <= box[3] <= image.height
    )
    # The box the evaluator gives that sample with the trained weights: the same weights, the same
    # letterbox and the same mapping back to the image's pixels (a model not loaded from best.pt is
    # pixels off).
    from refvg.engine.evaluator import predict_split

    model, _, _ = load_trained(stages.checkpoint_dir(cfg, "transvg") / BEST)
    split = PreparedSplit(prepared_path(cfg), "val")
    expected = predict_split(model, split, 8, torch.device("cpu"), "off").pred_xyxy[0]
    assert np.allclose(box, expected, atol=1e-2), (box, expected)


def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were(in_tiny):
    """A step skipped for a NaN loss still ran its forward, which moves BatchNorm's running
    statistics; after a divergence last.pt must equal, tensor for tensor (buffers included), the
    clean run's state after the same good steps."""
    from refvg.engine.trainer import NonFiniteLossError, train
    from tests.faults import poison_loss, small_training

    cfg, model, data = small_training(in_tiny, train={"max_bad_steps": 3})
    clean, before_step3, forwards = model(), {}, [0]

    def before_forward(
        module, _args
    ):  # the clean run's state after 2 updates, before step 3's forward
        forwards[0] += 1
        if forwards[0] == 3:
            before_step3.update({k: v.detach().clone() for k, v in module.state_dict().items()})

    clean.register_forward_pre_hook(before_forward)
    train(clean, data, cfg, in_tiny / "clean", method="t", evaluate=lambda _: {"acc@0.5": 0.0})

    diverging = model()
    poison_loss(diverging, set(range(3, 100)), "loss")
    with pytest.raises(NonFiniteLossError):
        train(
            diverging,
            data,
            cfg,
            in_tiny / "diverge",
            method="t",
            evaluate=lambda _: {"acc@0.5": 0.0},
        )
    kept = load_checkpoint(in_tiny / "diverge" / LAST)["model"]
    assert any("running_mean" in k for k in kept), "the test model has BatchNorm"
    assert [k for k, v in kept.items() if not torch.equal(v, before_step3[k])] == []


class _MainPlusAuxiliary(torch.nn.Module):
    """A grounding-like main loss on `a` (and `shared`) and an auxiliary term on `b` (and `shared`),
    as a method adds distillation / erased copies / mining over its ablation."""

    def __init__(self, aux_weight: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        self.shared = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = torch.nn.Parameter(torch.tensor([10.0, 10.0]))
        self.aux_weight = aux_weight
        self.auxiliary_loss = aux_weight > 0

    def forward(self, batch):
        return {}

    def compute_loss(self, outputs, batch):
        main = (self.a**2).sum() + (self.shared**2).sum()
        losses = {"main": main, "loss": main}
        if self.auxiliary_loss:
            aux = self.aux_weight * ((self.b**2).sum() + 5 * self.shared.sum())
            losses |= {"auxiliary": aux, "loss": main + aux}
        return losses


def _one_sgd_step(model, grad_clip: float) -> dict[str, torch.Tensor]:
    from refvg.config import TrainConfig
    from refvg.engine.trainer import _train_step

    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1
    )  # the step is the clipped gradient, visibly
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tcfg = TrainConfig(grad_clip=grad_clip)
    assert (
        _train_step(model, model, {}, optimizer, scheduler, tcfg, torch.device("cpu")) is not None
    )
    return {k: (p.detach() - before[k]) / -0.1 for k, p in model.named_parameters()}


@pytest.mark.parametrize("aux_weight", [1e-6, 1.0, 1e3])
def test_an_auxiliary_loss_never_rescales_the_main_terms_step(aux_weight):
    """Method vs ablation differ in the auxiliary term alone: with clipping on, the main loss's
    parameters get exactly the ablation's clipped gradient however large the auxiliary term (one
    clip of the sum shrank
    it: a method then also trained its grounding loss at another effective learning rate)."""
    ablation = _one_sgd_step(_MainPlusAuxiliary(0.0), grad_clip=1.0)
    method = _one_sgd_step(_MainPlusAuxiliary(aux_weight), grad_clip=1.0)
    torch.testing.assert_close(method["a"], ablation["a"], rtol=0, atol=0)
    # The shared parameter gets the main term's clipped gradient plus the auxiliary's, clipped on
    # its own.
    aux_grad = torch.cat(
        [2 * aux_weight * torch.tensor([10.0, 10.0]), torch.full((2,), 5.0 * aux_weight)]
    )
    aux_clipped = aux_grad * min(1.0, 1.0 / (float(aux_grad.norm()) + 1e-6))
    torch.testing.assert_close(method["shared"], ablation["shared"] + aux_clipped[2:])
    torch.testing.assert_close(method["b"], aux_clipped[:2])
    assert float(torch.cat([ablation["a"], ablation["shared"]]).norm()) == pytest.approx(
        1.0, abs=1e-5
    )  # clipped
    # Without clipping the gradients simply add: one backward, the same main-term step.
    free = _one_sgd_step(_MainPlusAuxiliary(aux_weight), grad_clip=0.0)
    torch.testing.assert_close(free["a"], torch.tensor([6.0, -8.0]))
    torch.testing.assert_close(free["shared"], torch.tensor([2.0, 4.0]) + aux_grad[2:])


def test_each_methods_auxiliary_term_is_exactly_what_its_ablation_lacks():
    """What the trainer clips apart: CM-Erase's erased copies and the attention mining, and nothing
    of the loss the ablation also has (EpmVG's distillation: tests/models/test_epmvg.py)."""
    from refvg.models import build_model
    from tests.models.test_mattnet import _batch as mattnet_batch, _model as mattnet_model
    from tests.models.test_weak_cam import _grads, _tiny_cfg as weak_cfg

    erase = mattnet_model(erase={"type": "both", "rate": 1.0})
    plain = mattnet_model(erase={"type": "none"})
    assert erase.auxiliary_loss and not plain.auxiliary_loss
    batch = mattnet_batch()
    losses = erase.train().compute_loss(erase(batch), batch)
    assert losses["auxiliary"].requires_grad and losses["auxiliary"].item() > 0
    torch.testing.assert_close(
        losses["loss"] - losses["auxiliary"],
        losses["ce"] + erase.config.rank_weight * losses["rank"],
    )
    _, mined = _grads(1.0)
    _, unmined = _grads(0.0)
    torch.testing.assert_close(mined["auxiliary"], mined["mining"])
    assert "auxiliary" not in unmined
    assert build_model("weak_cam", weak_cfg(1.0), vocab_size=60, pad_token_id=0).auxiliary_loss
    assert not build_model("weak_cam", weak_cfg(0.0), vocab_size=60, pad_token_id=0).auxiliary_loss


def test_image_blind_control_trains_and_evaluates_on_blank_images(in_tiny, monkeypatch):
    """The flag reaches both stages: the trainer's splits and, read back from the checkpoint, the
    evaluation's; the metrics and the report say so."""
    from refvg.stages import splits

    method = "transvg_image_blind"
    write_params(
        in_tiny,
        methods={method: {"model": "transvg", "image_blind": True}},
        train={"epochs": 1, "batch_size": 16, "warmup_steps": 2},
    )
    cfg = load_config("params.yaml")
    opened = []
    real_open = splits.open_split

    def spy(*args, **kwargs):
        ds = real_open(*args, **kwargs)
        opened.append((args[2], ds))
        return ds

    for module in ("refvg.stages.splits", "refvg.stages.train", "refvg.stages.evaluate"):
        monkeypatch.setattr(f"{module}.open_split", spy)
    stages.train_method(cfg, method)
    state = load_checkpoint(stages.checkpoint_dir(cfg, method) / BEST)
    assert state["image_blind"] is True and state["language_blind"] is False
    rep = stages.evaluate_method(cfg, method)
    assert {split for split, _ in opened} >= {"train", "val", "testA", "testB"}
    for split, ds in opened:
        assert ds.image_blind and (ds[0]["image"] == 0).all(), split
    payload = json.loads(rep.metrics_path.read_text())
    assert payload["image_blind"] is True and payload["language_blind"] is False
