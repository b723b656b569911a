"""The CLIP teacher trains through the one training loop (refvg.engine.trainer): kill -9 mid-epoch
then the same command again ends bitwise like an uninterrupted run; best.pt is the epoch its
held-out caption retrieval picks; the non-finite guard covers it."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import torch

from refvg import stages
from refvg.config import load_config
from refvg.engine.checkpoint import load_checkpoint
from refvg.engine.trainer import BEST, LAST
from refvg.engine import teacher as tt
from refvg.models import clip_teacher as ct
from tests.helpers import write_params
from tests.faults import teacher_process

# 64 training images in batches of 16: 4 steps an epoch, last.pt every 2 steps
TEACHER = {
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
    "projection_dim": 16,
    "epochs": 2,
    "batch_size": 16,
    "warmup_steps": 2,
    "corpus_images": 80,
    "corpus_held_out": 16,
}
EPMVG = {"epmvg": {"model": "epmvg"}}
TIMINGS = ("samples_per_second", "epoch_seconds")


def _teacher_params(folder: Path, **teacher) -> None:
    write_params(
        folder,
        teacher={**TEACHER, **teacher},
        distill_methods=EPMVG,
        train={"checkpoint_every_steps": 2},
    )


def _results(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in history]


def _weights(out: Path) -> dict:
    return ct.load_teacher(str(out / "model"), TEACHER["projection_dim"]).state_dict()


def test_teacher_killed_mid_epoch_resumes_bitwise(in_tiny):
    _teacher_params(in_tiny)
    cfg = load_config("params.yaml")
    out = Path(cfg.teacher.out_dir)
    reference = stages.teacher(cfg)
    ref_weights, ref_last = _weights(out), load_checkpoint(out / tt.TRAINING_DIR / LAST)
    shutil.rmtree(out)

    # kill -9 while fetching the first pair of step 3: the step-2 checkpoint is the resume point
    killed = teacher_process(in_tiny, kill_at_item=2 * TEACHER["batch_size"] + 1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = load_checkpoint(out / tt.TRAINING_DIR / LAST)
    assert (state["epoch"], state["progress"]["step"]) == (0, 2)
    assert not (out / "model").exists()  # no half-written teacher

    done = teacher_process(in_tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "after 0 epochs and 2 steps" in done.stderr
    final = json.loads(done.stdout.strip().splitlines()[-1])
    weights = _weights(out)
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    last = load_checkpoint(out / tt.TRAINING_DIR / LAST)
    assert all(torch.equal(last["model"][k], ref_last["model"][k]) for k in ref_last["model"])
    assert final["corpus"] == reference["corpus"] and final["val"] == reference["val"]
    assert _results(final["history"]) == _results(reference["history"])


def test_teacher_keeps_its_best_epoch_and_its_metric_names(in_tiny):
    _teacher_params(in_tiny, epochs=3)
    cfg = load_config("params.yaml")
    epochs = []
    result = stages.teacher(
        cfg, on_epoch_end=lambda metrics, epoch: epochs.append((epoch, metrics))
    )
    out = Path(result["out_dir"])
    assert [e for e, _ in epochs] == [1, 2, 3] and [h["epoch"] for h in result["history"]] == [
        1,
        2,
        3,
    ]
    # the teacher's own names, as before it trained through the shared loop
    assert {"train/loss", "corpus/text_recall@1", "val/recall@1", "lr"} <= set(epochs[0][1])
    best = load_checkpoint(out / tt.TRAINING_DIR / BEST)
    recalls = [h[tt.SELECT_METRIC] for h in result["history"]]
    assert best["best_epoch"] == 1 + recalls.index(max(recalls))
    saved = _weights(out)
    assert all(
        torch.equal(saved[k], best["model"][f"clip.{k}"]) for k in saved
    )  # the model/ folder is best.pt
    assert result["corpus"]["text_recall@1"] == max(recalls)

    # A rerun of the finished run trains nothing and replays the history.
    again = stages.teacher(cfg)
    assert _results(again["history"]) == _results(result["history"])
    assert again["corpus"] == result["corpus"]


def test_teacher_skips_a_non_finite_step(in_tiny, monkeypatch, caplog):
    _teacher_params(in_tiny, epochs=1)
    compute, calls = ct.ContrastiveTeacher.compute_loss, [0]

    def poisoned(self, outputs, batch):
        calls[0] += 1
        losses = compute(self, outputs, batch)
        return {"loss": losses["loss"] * float("nan")} if calls[0] == 2 else losses

    monkeypatch.setattr(ct.ContrastiveTeacher, "compute_loss", poisoned)
    result = stages.teacher(load_config("params.yaml"))
    assert result["history"][0]["train/skipped_steps"] == 1
    assert "step skipped" in caplog.text
    assert all(torch.isfinite(p).all() for p in _weights(Path(result["out_dir"])).values())


def test_teacher_run_maps_its_section_onto_the_trainer(in_tiny):
    _teacher_params(in_tiny, epochs=4, lr=0.005, warmup_steps=7, seed=3)
    cfg = load_config("params.yaml")
    run = tt.teacher_run(cfg).train
    assert (run.epochs, run.batch_size, run.lr, run.warmup_steps, run.seed, run.schedule) == (
        4,
        16,
        0.005,
        7,
        3,
        "cosine",
    )
    assert run.grad_clip == cfg.train.grad_clip and run.checkpoint_every_steps == 2
