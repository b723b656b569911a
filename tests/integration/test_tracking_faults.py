"""The tracking store failing under a stage: down at the start and back later, killed mid-training
(a real `mlflow server` process), down until the end (saved, then replayed), and several pipelines
opening one fresh sqlite store at once. Training never stops for any of it, and no logged value is
lost."""

from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from refvg.config import load_config
from refvg.engine.checkpoint import load_checkpoint
from refvg.engine.trainer import BEST, LAST, train
from refvg.tracking import replay, stage_run
from tests.helpers import write_params
from tests.faults import (
    MlflowServer,
    blocked_sqlite_store,
    log_process,
    log_then_kill_server,
    small_training,
)


def _stage_runs(client: MlflowClient) -> list:
    runs = client.search_runs([client.get_experiment_by_name("refvg").experiment_id])
    return [r for r in runs if r.data.tags.get("refvg.kind") == "stage"]


def _history(client, run_id, key):
    return [
        (m.step, m.value)
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    ]


def test_store_down_at_start_then_back_logging_resumes_in_order(tmp_path, monkeypatch, caplog):
    blocker, uri = blocked_sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(write_params(tmp_path, tracking={"unlogged_dir": str(tmp_path / "unlogged")}))
    with stage_run(cfg, "train@transvg", params={"lr": 0.1}) as tracker:
        assert not tracker.active and "runs untracked until it answers" in caplog.text
        tracker.log_metrics({"loss": 3.0}, step=1)
        tracker.log_metrics({"loss": 2.0}, step=2)
        assert [c["kind"] for c in tracker.pending] == ["params", "metrics", "metrics"]
        blocker.unlink()  # the store is back
        tracker.log_metrics({"loss": 1.0}, step=3)
        assert tracker.active and tracker.pending == []
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert _history(client, run.info.run_id, "loss") == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert run.data.params["lr"] == "0.1" and run.info.status == "FINISHED"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["refvg.kind"] == "pipeline" and parent.data.params["train.lr"] == str(
        cfg.train.lr
    )
    assert not (tmp_path / "unlogged").exists()


def test_calls_the_store_never_took_are_saved_reported_and_replayed(tmp_path, monkeypatch, caplog):
    blocker, uri = blocked_sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(write_params(tmp_path, tracking={"unlogged_dir": str(tmp_path / "unlogged")}))
    with pytest.raises(KeyboardInterrupt):
        with stage_run(cfg, "evaluate@transvg", params={"split": "val"}) as tracker:
            tracker.log_metrics({"val.acc@0.5": 0.8, "val.n": 38}, step=0)
            raise KeyboardInterrupt  # the stage itself fails too: the run must still end FAILED
    saved = list((tmp_path / "unlogged").glob("*.json"))
    assert len(saved) == 1 and "evaluate_transvg-no-run-" in saved[0].name
    assert (
        "not logged for stage evaluate@transvg (run not created): 2 "
        "metric values (steps 0), 1 params, "
        "the run's end (FAILED)"
    ) in caplog.text and "python -m refvg.tracking replay" in caplog.text
    assert not replay(saved[0]) and saved[0].exists()  # still down: nothing is dropped
    blocker.unlink()
    assert replay(saved[0]) and not saved[0].exists()
    client = MlflowClient(uri)
    [run] = _stage_runs(client)
    assert run.info.status == "FAILED" and run.data.metrics == {
        "val.acc_at_0.5": 0.8,
        "val.n": 38.0,
    }
    assert (
        run.data.params == {"split": "val"} and run.data.tags["refvg.stage"] == "evaluate@transvg"
    )


def test_tracking_server_killed_mid_training(in_tiny, tmp_path, monkeypatch, caplog):
    cfg, model, data = small_training(
        in_tiny,
        tracking={
            "http_retries": 1,
            "http_timeout_s": 5,
            "unlogged_dir": str(tmp_path / "unlogged"),
        },
    )
    ckpt = tmp_path / "ckpt"
    with MlflowServer(tmp_path / "server") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        with stage_run(
            cfg, "train@transvg", params={"train": cfg.train.model_dump(mode="json")}
        ) as tracker:
            on_epoch_end, stalls = log_then_kill_server(tracker, server, kill_after_epoch=1)
            result = train(
                model(),
                data,
                cfg,
                ckpt,
                method="transvg",
                evaluate=lambda m: {"acc@0.5": 0.5},
                on_epoch_end=on_epoch_end,
            )
            tracker.log_metrics({"best_val_acc_at_0.5": result.best_score})
        # Training went on to the end, and its checkpoints are whole.
        assert [h["epoch"] for h in result.history] == [1, 2]
        assert (
            load_checkpoint(ckpt / LAST)["epoch"] == 2
            and load_checkpoint(ckpt / BEST)["best_epoch"] == 1
        )
        assert "MLflow: could not log metrics" in caplog.text and tracker.failures >= 1
        assert stalls[1] < 30, f"a dead server stalled an epoch for {stalls[1]:.0f} s"
        [saved] = (tmp_path / "unlogged").glob("*.json")
        assert f"(run {tracker.run_id}): " in caplog.text and "steps 0, 2" in caplog.text

        server.start()  # the server is back: what it missed goes out
        assert replay(saved)
        client = MlflowClient(server.uri)
        run = client.get_run(tracker.run_id)
        assert [s for s, _ in _history(client, run.info.run_id, "val/acc_at_0.5")] == [1, 2]
        assert [v for _, v in _history(client, run.info.run_id, "train/loss")] == [
            h["train/loss"] for h in result.history
        ]
        assert (
            run.data.metrics["best_val_acc_at_0.5"] == result.best_score
            and run.info.status == "FINISHED"
        )


def test_pipelines_opening_one_fresh_sqlite_store_at_once(tmp_path):
    """Without the store lock, two processes on a fresh store race through MLflow's schema
    migrations ('table alembic_version already exists', 'duplicate column name: step') and one runs
    untracked; the half-migrated store can then fail every later process."""
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for name, lr in (("a", 0.001), ("b", 0.002)):
        write_params((tmp_path / name).mkdir() or tmp_path / name, train={"lr": lr})
    procs = [
        log_process(tmp_path / "a", "train@m1", 5, env),
        log_process(tmp_path / "a", "train@m2", 5, env),
        log_process(tmp_path / "b", "train@m1", 5, env),
    ]  # pipeline a's two stages, pipeline b's one
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and json.loads(out)["failures"] == 0, err[-3000:]
        assert "WARNING" not in err and "locked" not in err, err[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("refvg").experiment_id])
    parents = [r for r in runs if r.data.tags.get("refvg.kind") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("refvg.kind") == "stage"]
    assert len(parents) == 2, "one parent run per pipeline, even when its stages start together"
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 5 for r in children)


def test_a_fresh_sqlite_store_is_created_and_its_runs_found_under_the_store_lock(
    tmp_path, monkeypatch
):
    """The test above shows no collision when processes happen to race; this one shows the lock is
    held, with no race to win: at the moment the store is opened (schema created) and the parent run
    found or created, another process could not take the lock."""
    from filelock import FileLock, Timeout

    from refvg import tracking

    store = tmp_path / "shared" / "mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    seen: dict[str, bool] = {}

    def locked_while(name: str, real):
        def probe(*args, **kwargs):
            other = FileLock(
                f"{store}.lock", timeout=0
            )  # its own file descriptor: another process's view
            try:
                other.acquire()
                other.release()
                seen[name] = False
            except Timeout:
                seen[name] = True
            return real(*args, **kwargs)

        return probe

    monkeypatch.setattr(tracking, "_client", locked_while("open store", tracking._client))
    monkeypatch.setattr(
        tracking, "_open_run", locked_while("find or create runs", tracking._open_run)
    )
    with stage_run(
        load_config(write_params(tmp_path)), "train@m1", params={"stage": "train@m1"}
    ) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
    assert tracker.failures == 0 and tracker.run_id
    assert seen == {"open store": True, "find or create runs": True}
