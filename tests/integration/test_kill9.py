"""kill -9 at the points tests/integration/test_crash_safety.py does not reach: between the two
checkpoint writes of an epoch's end, inside validation, in a `dvc repro` stage (a stage worker's
child), and of both ranks of a 2-process torchrun. Each time the same command again must end bitwise
where an uninterrupted run ends. The faults enter through tests/faults.py's `inject` only."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refvg import stages
from refvg.config import load_config
from refvg.engine.checkpoint import load_checkpoint
from refvg.engine.hooks import NEXT_BEST
from refvg.engine.trainer import BEST, LAST
from tests.helpers import project_copy, write_params
from tests.faults import FAULTS_ENV, sitecustomize_dir, torchrun_train_process, train_process

TIMINGS = ("samples_per_second", "epoch_seconds")
TRAIN = {
    "checkpoint_every_steps": 4
}  # the tiny set has > 8 steps per epoch: mid-epoch checkpoints at 4, 8, ...


def _results(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in history]


def _assert_same_end(reference: Path, ckpt: Path) -> None:
    """last.pt and best.pt of `ckpt` hold what the uninterrupted run's hold: weights and optimizer
    state bitwise, the per-epoch results (timings aside) and the best epoch."""
    for name in (LAST, BEST):
        ref, got = load_checkpoint(reference / name), load_checkpoint(ckpt / name)
        assert ref["model"].keys() == got["model"].keys()
        differ = [k for k in ref["model"] if not torch.equal(ref["model"][k], got["model"][k])]
        assert not differ, (
            f"{name}: {len(differ)} tensors differ from the uninterrupted run's, e.g. {differ[:3]}"
        )
        assert _results(got["history"]) == _results(ref["history"]), name
        assert got["best_epoch"] == ref["best_epoch"], name
    ref, got = load_checkpoint(reference / LAST), load_checkpoint(ckpt / LAST)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            ref["optimizer"]["state"][0].values(), got["optimizer"]["state"][0].values()
        )
    )


def _assert_best_on_disk(ckpt: Path) -> None:
    """The resume point never names a best epoch that best.pt does not hold."""
    last = load_checkpoint(ckpt / LAST)
    if last["best_epoch"] >= 1:
        assert (ckpt / BEST).exists(), (
            f"last.pt records best epoch {last['best_epoch']}, and there is no best.pt"
        )
        assert load_checkpoint(ckpt / BEST)["epoch"] == last["best_epoch"]


@pytest.fixture(scope="module")
def reference(tiny_workdir, tmp_path_factory) -> Path:
    """The checkpoint folder of an uninterrupted run with TRAIN (in this process: same code, same
    seed)."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "data").symlink_to(tiny_workdir / "data")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        cfg = load_config(write_params(folder, train=TRAIN))
        stages.train_method(cfg, "transvg")
        return folder / stages.checkpoint_dir(cfg, "transvg")
    finally:
        os.chdir(cwd)


def test_kill_9_between_the_two_checkpoint_writes_of_an_epoch_end(in_tiny, reference):
    cfg = load_config(write_params(in_tiny, train=TRAIN))
    ckpt = stages.checkpoint_dir(cfg, "transvg")
    # epoch 1's end (its best so far): killed after its first write, the best candidate
    killed = train_process(in_tiny, kill_after_validation_write=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    written = [
        name
        for name in (LAST, BEST, NEXT_BEST)
        if (ckpt / name).exists() and load_checkpoint(ckpt / name)["epoch"] == 1
    ]
    assert written == [NEXT_BEST], f"epoch 1's end should have written best.pt.next only: {written}"
    _assert_best_on_disk(ckpt)

    done = train_process(in_tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removed" in done.stderr and NEXT_BEST in done.stderr  # last.pt did not name it
    assert not (ckpt / NEXT_BEST).exists()
    _assert_best_on_disk(ckpt)
    _assert_same_end(reference, ckpt)


def test_kill_9_during_validation(in_tiny, reference):
    cfg = load_config(write_params(in_tiny, train=TRAIN))
    ckpt = stages.checkpoint_dir(cfg, "transvg")
    killed = train_process(
        in_tiny, kill_in_validation=2
    )  # epoch 2's validation, its scores computed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = load_checkpoint(ckpt / LAST)
    # The epoch whose validation was cut is not recorded as done: the resume point is inside it.
    assert state["epoch"] == 1 and state["progress"]["step"] > 0 and len(state["history"]) == 1
    _assert_best_on_disk(ckpt)

    done = train_process(in_tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"after 1 epochs and {state['progress']['step']} steps" in done.stderr
    _assert_same_end(reference, ckpt)


@pytest.mark.e2e
def test_kill_9_of_both_ranks_under_torchrun_then_the_same_command(in_tiny):
    """2 gloo ranks, both killed mid-epoch (each while fetching its sample of step 7), then the same
    torchrun again: ends bitwise where an uninterrupted 2-rank run ends."""
    cfg = load_config(write_params(in_tiny, train={**TRAIN, "checkpoint_dir": "ckpt_ref"}))
    local_batch = cfg.train.batch_size // 2
    ref = torchrun_train_process(in_tiny)
    assert ref.returncode == 0, ref.stderr[-4000:]

    cfg = load_config(write_params(in_tiny, train={**TRAIN, "checkpoint_dir": "ckpt"}))
    ckpt = stages.checkpoint_dir(cfg, "transvg")
    killed = torchrun_train_process(in_tiny, kill_at_item=6 * local_batch + 3)
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-4000:]
    state = load_checkpoint(ckpt / LAST)
    assert (state["epoch"], state["progress"]["step"]) == (0, 4)

    done = torchrun_train_process(in_tiny)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "after 0 epochs and 4 steps" in done.stderr
    _assert_same_end(in_tiny / "ckpt_ref" / "transvg", ckpt)


@pytest.mark.e2e
def test_kill_9_in_a_dvc_repro_stage_then_dvc_repro_again(tmp_path, prefect_api):
    """`dvc repro train@transvg` with its training (a stage worker's child) killed mid-epoch 1, then
    `dvc repro`
    again: the stage resumes from its persisted last.pt and ends bitwise where an uninterrupted run
    ends."""
    repo = project_copy(tmp_path / "repo", train=TRAIN)
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_API_URL": prefect_api,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "PYTHONPATH": str(sitecustomize_dir(tmp_path / "site")),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def sh(*cmd: str, fault: str = "", ok: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, cwd=repo, env={**env, FAULTS_ENV: fault}, capture_output=True, text=True
        )
        assert (proc.returncode == 0) == ok, (
            f"{' '.join(cmd)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
        return proc

    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        sh(*cmd)
    cfg = load_config(repo / "params.yaml")
    ckpt = repo / stages.checkpoint_dir(cfg, "transvg")

    # kill -9 while the training fetches a sample of step 7 (last.pt holds step 4)
    fault = json.dumps({"kill_at_item": 6 * cfg.train.batch_size + 3})
    killed = sh("dvc", "repro", "train@transvg", fault=fault, ok=False)
    # DVC saw the stage die of the signal (the client dies as its worker's child did): -9 when the
    # shell DVC runs it with execs it (bash), 137 when it forks and reports the child (dash)
    died = "failed to run: python -m flows.train --method transvg, exited with "
    assert re.search(re.escape(died) + r"(-9|137)\b", killed.stderr), killed.stderr[-3000:]
    state = load_checkpoint(ckpt / LAST)
    assert (state["epoch"], state["progress"]["step"]) == (0, 4)

    done = sh("dvc", "repro", "train@transvg")
    assert (
        "Running stage 'train@transvg'" in done.stdout
        and "Running stage 'prepare'" not in done.stdout
    )
    assert "after 0 epochs and 4 steps" in done.stderr, done.stderr[
        -3000:
    ]  # DVC kept last.pt (persist)
    last_stage = json.loads((repo / ".refvg/timings.jsonl").read_text().splitlines()[-1])
    assert last_stage["args"]["method"] == "transvg" and last_stage["via_worker"], (
        last_stage
    )  # a worker's child

    # The reference: the same training uninterrupted, on the data the pipeline prepared, in another
    # folder.
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        ref_params = write_params(
            tmp_path, train={**TRAIN, "checkpoint_dir": str(tmp_path / "ref")}
        )
        stages.train_method(load_config(ref_params), "transvg")
    finally:
        os.chdir(cwd)
    _assert_same_end(tmp_path / "ref" / "transvg", ckpt)
