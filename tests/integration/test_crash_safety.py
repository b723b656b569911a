"""Training under faults: kill -9 at any point then the same command again (bitwise the same end on
CPU), a checkpoint write cut in half, SIGTERM (preemption: checkpoint at the step boundary, exit
143, resume), NaN/inf losses and gradients."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from refvg import stages
from refvg.config import load_config
from refvg.data.dataset import prepared_fingerprint, read_manifest
from refvg.data.prepare import prepared_path
from refvg.data.samplers import ResumableShuffle
from refvg.engine import preemption
from refvg.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from refvg.engine.trainer import BEST, LAST, NonFiniteLossError, train
from tests.helpers import write_params
from tests.faults import poison_loss, small_training, spawn_train_process, train_process

TIMINGS = ("samples_per_second", "epoch_seconds")


def _results(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in history]


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_mid_epoch_then_rerun_ends_bitwise_like_an_uninterrupted_run(in_tiny):
    write_params(in_tiny, train={"checkpoint_every_steps": 4})
    cfg = load_config("params.yaml")
    ckpt = stages.checkpoint_dir(cfg, "transvg")
    steps_per_epoch = (
        read_manifest(prepared_path(cfg))["splits"]["train"]["samples"] // cfg.train.batch_size
    )
    assert steps_per_epoch > 8  # the kill below must fall mid-epoch
    reference = stages.train_method(cfg, "transvg")
    ref_last, ref_best = load_checkpoint(ckpt / LAST), load_checkpoint(ckpt / BEST)
    shutil.rmtree(ckpt)

    # kill -9 in epoch 1, half-way through writing the step-8 checkpoint: the step-4 one must
    # survive whole.
    killed = train_process(in_tiny, kill_in_write=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert list(ckpt.glob(".last.pt.*.tmp")), "the cut-short write should have left its temp file"
    state = load_checkpoint(ckpt / LAST)
    assert (state["epoch"], state["progress"]["step"]) == (0, 4)

    # The same command again: resumes mid-epoch, drops the partial file, ends exactly where the
    # reference did.
    done = train_process(in_tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "after 0 epochs and 4 steps" in done.stderr
        and "a checkpoint write cut short by a crash" in done.stderr
    )
    assert json.loads(done.stdout.strip().splitlines()[-1])["resumed_from_step"] == 4
    assert not list(ckpt.glob(".*.tmp"))
    last, best = load_checkpoint(ckpt / LAST), load_checkpoint(ckpt / BEST)
    assert _same_tensors(ref_last["model"], last["model"]) and _same_tensors(
        ref_best["model"], best["model"]
    )
    assert ref_last["optimizer"]["state"][0]["step"] == last["optimizer"]["state"][0]["step"]
    assert _results(last["history"]) == _results(reference.history)
    assert best["best_epoch"] == reference.best_epoch


def _wait_for_file(path, proc) -> None:
    """Until the process wrote `path` (it is stepping); fails if it exits first."""
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before it started stepping"
        time.sleep(0.05)


def _sigterm_once_stepping(proc, started, check=lambda: None) -> None:
    """SIGTERM as a scheduler sends it, once the process steps; waits for it to exit (killed if the
    test fails first)."""
    try:
        _wait_for_file(started, proc)
        check()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_saves_at_the_step_boundary_exits_143_and_the_rerun_ends_bitwise(in_tiny, tmp_path):
    # the only mid-epoch checkpoint: SIGTERM's
    write_params(in_tiny, train={"checkpoint_every_steps": 0})
    cfg = load_config("params.yaml")
    ckpt = stages.checkpoint_dir(cfg, "transvg")
    reference = stages.train_method(cfg, "transvg")
    ref_last, ref_best = load_checkpoint(ckpt / LAST), load_checkpoint(ckpt / BEST)
    shutil.rmtree(ckpt)

    # SIGTERM while the process fetches its 3rd batch: it finishes that step, saves, exits 143.
    started, log = tmp_path / "started", tmp_path / "train.log"
    third_batch = 2 * cfg.train.batch_size + 1
    proc = spawn_train_process(in_tiny, log, term_at_item=third_batch, started=started)
    _sigterm_once_stepping(proc, started)
    out = log.read_text()
    assert proc.returncode == preemption.PREEMPTED_EXIT_CODE == 143, out[-3000:]
    assert "stopped in epoch 1 after step 3 with a resumable checkpoint" in out
    state = load_checkpoint(ckpt / LAST)
    assert (state["epoch"], state["progress"]["step"]) == (0, 3)
    assert not (ckpt / BEST).exists()  # no epoch was validated yet

    done = train_process(in_tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "after 0 epochs and 3 steps" in done.stderr
    last, best = load_checkpoint(ckpt / LAST), load_checkpoint(ckpt / BEST)
    assert _same_tensors(ref_last["model"], last["model"])
    assert _same_tensors(ref_best["model"], best["model"])
    assert _same_tensors(ref_last["optimizer"]["state"][0], last["optimizer"]["state"][0])
    assert _results(last["history"]) == _results(reference.history)


def test_sigterm_in_process_raises_preempted_and_restores_the_handler(in_tiny, tmp_path):
    cfg, build, data = small_training(in_tiny)
    train(build(), data, cfg, tmp_path / "ref", method="t", evaluate=_no_eval)
    model = build()
    _sigterm_on_call(model, 6)  # epoch 2, step 2 (4 steps per epoch)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(preemption.Preempted) as stop:
        train(model, data, cfg, tmp_path / "run", method="t", evaluate=_no_eval)
    assert stop.value.code == 143 and "epoch 2 after step 2" in str(stop.value)
    assert signal.getsignal(signal.SIGTERM) is before  # SIGTERM outside training is untouched
    state = load_checkpoint(tmp_path / "run" / LAST)
    assert (state["epoch"], state["progress"]["step"]) == (1, 2)
    result = train(build(), data, cfg, tmp_path / "run", method="t", evaluate=_no_eval)
    assert (result.resumed_from_epoch, result.resumed_from_step) == (1, 2)
    ref, run = load_checkpoint(tmp_path / "ref" / LAST), load_checkpoint(tmp_path / "run" / LAST)
    assert _same_tensors(ref["model"], run["model"])
    assert _results(ref["history"]) == _results(run["history"])


def _sigterm_on_call(model, n: int) -> None:
    """SIGTERM during the n-th compute_loss, as a scheduler sends it: from another process (`kill`),
    to this one."""
    compute, calls = model.compute_loss, [0]

    def compute_loss(outputs, batch):
        calls[0] += 1
        if calls[0] == n:
            subprocess.run(["kill", "-TERM", str(os.getpid())], check=True)
            while not preemption.requested():  # delivered to this process asynchronously
                time.sleep(0.01)
        return compute(outputs, batch)

    model.compute_loss = compute_loss


@pytest.mark.e2e
def test_sigterm_reaches_training_in_a_stage_worker_child(in_tiny, tmp_path):
    """A DVC stage runs in a stage worker's child (flows/launcher.py): SIGTERM to the stage process
    DVC started is forwarded there, and its exit code comes back."""
    write_params(in_tiny, train={"checkpoint_every_steps": 0})
    cfg = load_config("params.yaml")
    ckpt = stages.checkpoint_dir(cfg, "transvg")
    started, log = tmp_path / "started", tmp_path / "train.log"
    proc = spawn_train_process(
        in_tiny,
        log,
        term_at_item=cfg.train.batch_size + 1,
        started=started,
        via_worker=True,
        env={"REFVG_PREFECT_SERVER": "ephemeral"},
    )

    def in_the_workers_child() -> None:
        assert int(started.read_text()) != proc.pid, "the training ran in the worker's child"

    _sigterm_once_stepping(proc, started, in_the_workers_child)
    out = log.read_text()
    assert proc.returncode == 143, out[-3000:]
    assert "stopped in epoch 1 after step 2 with a resumable checkpoint" in out
    assert "stage worker unavailable" not in out
    state = load_checkpoint(ckpt / LAST)
    assert (state["epoch"], state["progress"]["step"]) == (0, 2)


def _no_eval(model) -> dict:
    return {"acc@0.5": 0.0}


def test_resume_at_an_epoch_boundary_replays_the_history(in_tiny, tmp_path):
    cfg, model, data = small_training(in_tiny)
    train(model(), data, cfg, tmp_path / "ref", method="t", evaluate=_no_eval)

    def stop_after_first(metrics, epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            model(),
            data,
            cfg,
            tmp_path / "run",
            method="t",
            evaluate=_no_eval,
            on_epoch_end=stop_after_first,
        )
    seen = []
    result = train(
        model(),
        data,
        cfg,
        tmp_path / "run",
        method="t",
        evaluate=_no_eval,
        on_epoch_end=lambda metrics, epoch: seen.append(epoch),
    )
    assert (result.resumed_from_epoch, result.resumed_from_step) == (1, 0)
    assert seen == [
        1,
        2,
    ]  # epoch 1 replayed from the checkpoint, for a tracker attached to this process
    ref, run = load_checkpoint(tmp_path / "ref" / LAST), load_checkpoint(tmp_path / "run" / LAST)
    assert _same_tensors(ref["model"], run["model"]) and _results(ref["history"]) == _results(
        run["history"]
    )


class _Crash(Exception):
    """A crash right after a checkpoint write: what is on disk is what a kill -9 there leaves."""


def _crash_after_writing(monkeypatch, name: str, epochs_done: int) -> None:
    from refvg.engine import hooks

    save = hooks.save_checkpoint

    def save_then_crash(state, path):
        save(state, path)
        if Path(path).name == name and state["epoch"] == epochs_done:
            raise _Crash

    monkeypatch.setattr(hooks, "save_checkpoint", save_then_crash)


def _scores(*values: float):
    """An `evaluate` giving these acc@0.5 in turn: a rerun's validation of an epoch can differ from
    the first (nondeterministic kernels on a GPU)."""
    it = iter(values)
    return lambda model: {"acc@0.5": next(it)}


def test_a_kill_between_the_epoch_end_writes_never_leaves_a_best_pt_last_pt_does_not_name(
    in_tiny, tmp_path, monkeypatch
):
    """Epoch 2 beats epoch 1; the process dies after writing the new best, before last.pt. Before
    the fix best.pt already held epoch 2 then; the rerun, validating epoch 2 lower, kept it while
    reporting epoch 1 as the best."""
    from refvg.engine.hooks import NEXT_BEST

    cfg, build, data = small_training(in_tiny)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_after_writing(m, NEXT_BEST, epochs_done=2)
        with pytest.raises(_Crash):
            train(build(), data, cfg, out, method="t", evaluate=_scores(0.1, 0.2))
    last, best = load_checkpoint(out / LAST), load_checkpoint(out / BEST)
    assert (last["epoch"], last["best_epoch"], best["epoch"]) == (1, 1, 1)
    epoch_1 = (out / BEST).read_bytes()

    result = train(build(), data, cfg, out, method="t", evaluate=_scores(0.05))
    assert result.resumed_from_epoch == 1 and result.best_epoch == 1
    assert load_checkpoint(out / BEST)["epoch"] == 1 and (out / BEST).read_bytes() == epoch_1
    assert not (out / NEXT_BEST).exists()


def test_a_kill_after_last_pt_records_a_new_best_publishes_it_on_resume(
    in_tiny, tmp_path, monkeypatch
):
    from refvg.engine.hooks import NEXT_BEST

    cfg, build, data = small_training(in_tiny)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_after_writing(m, LAST, epochs_done=2)  # last.pt written, best.pt.next not renamed
        with pytest.raises(_Crash):
            train(build(), data, cfg, out, method="t", evaluate=_scores(0.1, 0.2))
    assert load_checkpoint(out / LAST)["best_epoch"] == 2 and (out / NEXT_BEST).exists()

    result = train(build(), data, cfg, out, method="t", evaluate=_scores())  # nothing left to do
    assert (result.resumed_from_epoch, result.best_epoch) == (2, 2)
    best, last = load_checkpoint(out / BEST), load_checkpoint(out / LAST)
    assert best["epoch"] == 2 and _same_tensors(best["model"], last["model"])
    assert not (out / NEXT_BEST).exists()


def test_resume_refuses_a_damaged_checkpoint_and_restarts_a_changed_run(in_tiny, tmp_path, caplog):
    from refvg.engine.trainer import run_key

    cfg, model, data = small_training(in_tiny)
    (tmp_path / LAST).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"last\.pt.*Move it away to train from scratch"):
        train(model(), data, cfg, tmp_path, method="t", evaluate=_no_eval)
    # Ours, with the right key, but missing what resume needs (e.g. best.pt copied over last.pt).
    save_checkpoint({"run_key": run_key(cfg, "t"), "model": {}}, tmp_path / LAST)
    with pytest.raises(CheckpointError, match=r"not optimizer, scheduler"):
        train(model(), data, cfg, tmp_path, method="t", evaluate=_no_eval)
    # Another run's checkpoint (a knob that changes the result differs): a warning, then a fresh
    # start.
    save_checkpoint({"run_key": "0" * 16}, tmp_path / LAST)
    result = train(model(), data, cfg, tmp_path, method="t", evaluate=_no_eval)
    assert result.resumed_from_epoch == 0 and "belongs to another run" in caplog.text
    assert len(result.history) == 2


def test_run_key_ignores_knobs_that_do_not_change_the_result(tmp_path):
    from refvg.engine.trainer import run_key

    base = load_config(write_params(tmp_path))
    neutral = load_config(
        write_params(
            tmp_path,
            train={"checkpoint_every_steps": 7, "max_bad_steps": 3},
            tracking={"experiment": "other"},
        )
    )
    changed = load_config(write_params(tmp_path, train={"lr": 0.01}))
    assert run_key(base, "transvg") == run_key(neutral, "transvg") != run_key(changed, "transvg")
    assert run_key(base, "transvg", "data-a") != run_key(base, "transvg", "data-b")


def test_prepared_fingerprint_follows_the_data(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "train" / "samples.json").write_text('[{"sentence": "red circle"}]')
    (tmp_path / "train" / "images.npy").write_bytes(b"\0" * 64)
    before = prepared_fingerprint(tmp_path)
    assert prepared_fingerprint(tmp_path) == before
    (tmp_path / "train" / "samples.json").write_text('[{"sentence": "blue circle"}]')
    assert prepared_fingerprint(tmp_path) != before
    before = prepared_fingerprint(tmp_path)
    (tmp_path / "train" / "images.npy").write_bytes(b"\1" * 65)  # rewritten by a new `prepare`
    assert prepared_fingerprint(tmp_path) != before


def test_sampler_position_restores_the_same_order():
    a = ResumableShuffle(10, seed=3)
    first, second = list(a), list(a)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    b = ResumableShuffle(10, seed=3)
    it = iter(b)
    head = [next(it) for _ in range(4)]
    pos = b.position(4)
    c = ResumableShuffle(10, seed=99)
    c.restore(pos)
    assert (
        len(c) == 6 and head + list(c) == first and list(c) == second
    )  # rest of epoch 1, then epoch 2
    with pytest.raises(ValueError, match="outside an epoch"):
        c.restore({"generator": pos["generator"], "consumed": 11})


# ---------------------------------------------------------------- NaN / inf


def _updates(path) -> int:
    return int(load_checkpoint(path)["optimizer"]["state"][0]["step"])


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_steps_are_skipped_and_counted(in_tiny, tmp_path, caplog, where):
    cfg, build, data = small_training(in_tiny)
    model = build()
    poison_loss(model, {2, 3, 6}, where)
    seen = []
    result = train(
        model,
        data,
        cfg,
        tmp_path / "ckpt",
        method="t",
        evaluate=_no_eval,
        on_epoch_end=lambda metrics, epoch: seen.append(metrics["train/skipped_steps"]),
    )
    assert seen == [2, 1] and result.skipped_steps == 3
    assert _updates(tmp_path / "ckpt" / LAST) == 8 - 3  # a skipped step updates nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "step skipped" in caplog.text and "batch rows [" in caplog.text
    assert all(math.isfinite(h["train/loss"]) for h in result.history)


def test_too_many_bad_steps_in_a_row_stop_with_a_usable_checkpoint(in_tiny, tmp_path):
    cfg, build, data = small_training(in_tiny, train={"max_bad_steps": 3})
    model = build()
    poison_loss(model, set(range(3, 100)), "loss")  # diverges after two good steps
    with pytest.raises(
        NonFiniteLossError, match=r"3 steps in a row \(train\.max_bad_steps=3\).*last\.pt"
    ):
        train(model, data, cfg, tmp_path / "ckpt", method="t", evaluate=_no_eval)
    state = load_checkpoint(tmp_path / "ckpt" / LAST)
    assert _updates(tmp_path / "ckpt" / LAST) == 2  # the state after the last good step
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    # Two bad steps ended epoch 1, the third was epoch 2's first: "in a row" spans the epoch
    # boundary.
    assert (state["epoch"], state["progress"]["step"], state["progress"]["bad_in_a_row"]) == (
        1,
        1,
        3,
    )
