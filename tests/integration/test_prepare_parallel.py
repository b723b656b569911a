"""Parallel `prepare`: the image work cut into shards (library), mapped as Prefect tasks over Dask
worker processes or threads (flow). Whatever runs the shards, the prepared dataset is the same as
the one-process path, bad images included."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

import pytest

from refvg.config import load_config
from refvg.data.prepare import Shard, letterbox_shard, plan_shards, prepare_dataset, prepared_path
from refvg.data.refer import BadRecordError
from tests.helpers import write_params


def _split_arrays(prepared) -> dict:
    out = {}
    for split_dir in sorted(p for p in prepared.iterdir() if p.is_dir() and p.name != "tokenizer"):
        out[split_dir.name] = (
            np.load(split_dir / "images.npy"),
            json.loads((split_dir / "samples.json").read_text()),
        )
        assert not list(split_dir.glob(".shard-*")), "shard files must not outlive the merge"
    return out


def _assert_same(a, b) -> None:
    assert a.keys() == b.keys()
    for split in a:
        assert np.array_equal(a[split][0], b[split][0]), split
        assert a[split][1] == b[split][1], split


@pytest.fixture
def raw_with_a_bad_image(tiny_workdir, tmp_path, monkeypatch):
    """A copy of the tiny raw dataset with one truncated image, cwd there."""
    shutil.copytree(tiny_workdir / "data" / "raw", tmp_path / "data" / "raw")
    monkeypatch.chdir(tmp_path)
    victim = sorted((tmp_path / "data/raw/refshapes/images").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:80])
    return victim


def test_plan_cuts_every_split_and_a_shard_reports_bad_images(raw_with_a_bad_image, tmp_path):
    from refvg.data.prepare import ImageJob

    jobs = {
        "train": [ImageJob(i, f"img{i}.png", 10, 10) for i in range(10)],
        "val": [ImageJob(99, "v.png", 10, 10)],
    }
    shards = plan_shards(jobs, 32, tmp_path / "out", num_shards=4, strict=False)
    assert [(s.split, len(s.jobs)) for s in shards] == [
        ("train", 3),
        ("train", 3),
        ("train", 3),
        ("train", 1),
        ("val", 1),
    ]
    assert [j for s in shards for j in s.jobs] == jobs["train"] + jobs[
        "val"
    ]  # nothing lost, order kept

    result = letterbox_shard(
        Shard(
            "train",
            0,
            (ImageJob(7, str(raw_with_a_bad_image), 64, 64),),
            32,
            str(tmp_path / "s.npy"),
            strict=False,
        )
    )
    assert result.image_ids == [] and result.bad[7][0] == "corrupt_image"
    with pytest.raises(BadRecordError, match=raw_with_a_bad_image.name):
        letterbox_shard(
            Shard(
                "train",
                0,
                (ImageJob(7, str(raw_with_a_bad_image), 64, 64),),
                32,
                str(tmp_path / "s.npy"),
                strict=True,
            )
        )


PIDS_ENV = "REFVG_TEST_SHARD_PIDS"


def _letterbox_noting_pid(shard: Shard):
    """letterbox_shard, noting which process ran it (a Dask worker imports this module by name)."""
    with open(os.environ[PIDS_ENV], "a") as out:
        out.write(f"{os.getpid()}\n")
    return letterbox_shard(shard)


@pytest.mark.parametrize("runner", ["dask", "threads"])
def test_prepare_flow_maps_shards_and_matches_one_process(
    raw_with_a_bad_image, tmp_path, prefect_api, mlflow_uri, runner, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    from flows.stages import prepare_flow

    cfg = load_config(
        write_params(tmp_path, data={"image_size": 64, "prepared_dir": "data/sequential"})
    )
    reference = prepare_dataset(cfg)  # one process, one shard per split

    write_params(
        tmp_path,
        data={"image_size": 64, "prepared_dir": "data/sharded"},
        parallel={"prepare_shards": 5, "prepare_runner": runner, "prepare_workers": 2},
    )
    pids = tmp_path / "shard_pids.txt"
    monkeypatch.setenv(PIDS_ENV, str(pids))
    monkeypatch.setattr("refvg.data.prepare.letterbox_shard", _letterbox_noting_pid)
    state = prepare_flow(params="params.yaml", return_state=True)
    assert state.is_completed(), state.message
    ran_in = pids.read_text().split()  # one line per shard run
    if runner == "dask":  # Dask's worker processes, not threads of this one
        assert str(os.getpid()) not in ran_in, ran_in
    else:
        assert set(ran_in) == {str(os.getpid())}, ran_in
    manifest = state.result()["manifest"]
    assert (
        manifest["skipped"] == reference["skipped"]
        and manifest["skipped"]["counts"]["corrupt_image"] >= 1
    )
    assert manifest["splits"] == reference["splits"]
    _assert_same(
        _split_arrays(prepared_path(load_config("params.yaml"))), _split_arrays(prepared_path(cfg))
    )

    # Task-run states reach the server as events, recorded asynchronously: wait until it has the
    # last ones (the ceiling only bounds a hang; on a busy machine the events can take a minute).
    deadline = time.monotonic() + 600
    while True:
        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
                ),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=200,
            )
        shards = [t for t in tasks if t.name.startswith("letterbox-")]
        done = len(shards) >= 5 and all(
            t.state is not None and t.state.is_completed() for t in shards
        )
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done, [(t.name, t.state) for t in shards]
    assert len(ran_in) == len(shards), (ran_in, [t.name for t in shards])
