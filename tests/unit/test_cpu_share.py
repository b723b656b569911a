"""Trainings side by side share the cores: each uses cores // (trainings computing) threads,
recounted as others start and end, and a killed one gives its share back."""

from __future__ import annotations

import subprocess
import sys

import torch

from refvg.engine import runtime
from refvg.engine.runtime import CpuShare, thread_share


def test_thread_share():
    assert thread_share(cores=16, cap=16, holders=1) == 16
    assert thread_share(cores=16, cap=16, holders=2) == 8
    assert thread_share(cores=16, cap=4, holders=2) == 4  # never more than alone (OMP_NUM_THREADS)
    assert thread_share(cores=2, cap=2, holders=3) == 1


def test_each_training_gets_its_share_and_a_killed_one_gives_it_back(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_cores", lambda: 8)
    before = torch.get_num_threads()
    first = CpuShare(tmp_path)
    try:
        first.enter()
        first.cap = 8  # as alone on an 8-core machine
        first.refresh(force=True)
        assert first.holders() == 1 and torch.get_num_threads() == 8

        second = CpuShare(tmp_path).enter()  # another training starts
        first.refresh(force=True)
        assert first.holders() == second.holders() == 2 and torch.get_num_threads() == 4
        second.leave()

        # A training killed mid-run: the kernel drops its lock with the process.
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, sys; f = open(sys.argv[1], 'a'); "
                "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
                str(tmp_path / "slot-9.lock"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            first.refresh(force=True)
            assert torch.get_num_threads() == 4
        finally:
            holder.kill()
            holder.wait()
        first.refresh(force=True)
        assert first.holders() == 1 and torch.get_num_threads() == 8
        first.leave()
        assert torch.get_num_threads() == 8  # back to what it would use alone
    finally:
        first.leave()
        torch.set_num_threads(before)


def test_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("REFVG_CPU_SHARE", "0")
    share = CpuShare(tmp_path).enter()
    assert share.file is None and not list(tmp_path.glob("slot-*"))


def test_its_per_user_folder_is_closed_to_others(tmp_path, monkeypatch):
    """The slots' parent is the stage worker's per-user folder too: made open to others, the worker
    refused it and every later stage ran in-process."""
    import stat

    monkeypatch.delenv("REFVG_CPU_SHARE", raising=False)
    share = CpuShare(tmp_path / "refvg-user" / "cpu-slots")
    try:
        share.enter()
        for folder in (tmp_path / "refvg-user", tmp_path / "refvg-user" / "cpu-slots"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    finally:
        share.leave()
