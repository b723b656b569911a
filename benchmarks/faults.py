"""Injects every fault of the reliability issue into a tiny refvg setup and prints, per fault, what happened:
injected, recovered (the run ended in its designed safe state: resumed or completed, or stopped / refused
with the input named), and data lost (must be 0).

    python benchmarks/faults.py            # ~5-10 min on 2 CPU cores (several small trainings, 2 MLflow server starts)

Data lost, per fault: training — tensors and per-epoch results that differ from an uninterrupted run with the
same seed (bitwise); inputs — good records dropped besides the bad one; tracking — logged values missing from
the store once it is back (after `python -m refvg.tracking replay` where the stage ended while it was down).
The injectors are the tests' (tests/faults.py); the tests assert the same behaviour case by case.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refvg.tracking import disable_telemetry  # noqa: E402

disable_telemetry()
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from refvg import stages  # noqa: E402
from refvg.config import ConfigError, load_config  # noqa: E402
from refvg.data.dataset import read_manifest  # noqa: E402
from refvg.data.prepare import prepare_dataset  # noqa: E402
from refvg.data.refer import BadRecordError, ReferDataset, load_refs  # noqa: E402
from refvg.engine.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from refvg.engine.trainer import BEST, LAST, NonFiniteLossError, train  # noqa: E402
from refvg.tracking import replay, stage_run  # noqa: E402
from tests.conftest import write_params  # noqa: E402
from tests.faults import (  # noqa: E402
    MlflowServer, blocked_sqlite_store, log_process, log_then_kill_server, poison_loss, small_training, train_process, truncated_jpeg,
)

RESULTS: list[dict] = []
TIMINGS = ("samples_per_second", "epoch_seconds")


def record(fault: str, recovered: bool, lost: int, note: str) -> None:
    RESULTS.append({"fault": fault, "recovered": recovered, "lost": lost, "note": note})
    print(f"  {fault}: {'recovered' if recovered else 'NOT RECOVERED'}, data lost {lost} — {note}", flush=True)


def differences(reference: dict, state: dict) -> int:
    """Tensors of the final weights and per-epoch results that differ from the uninterrupted run."""
    weights = sum(not torch.equal(reference["model"][k], state["model"][k]) for k in reference["model"])
    strip = lambda hist: [{k: v for k, v in h.items() if k not in TIMINGS} for h in hist]  # noqa: E731
    epochs = sum(a != b for a, b in zip(strip(reference["history"]), strip(state["history"])))
    return weights + epochs + abs(len(reference["history"]) - len(state["history"]))


@contextlib.contextmanager
def workdir(base: Path, name: str, **params):
    """A folder with the tiny dataset (linked) and its own params.yaml, as cwd."""
    folder = base / name
    folder.mkdir()
    (folder / "data").symlink_to(base / "tiny" / "data")
    write_params(folder, **params)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(cwd)


# ---------------------------------------------------------------- training


def kill_and_resume(base: Path) -> None:
    with workdir(base, "kill", train={"checkpoint_every_steps": 4}) as folder:
        cfg = load_config("params.yaml")
        ckpt = stages.checkpoint_dir(cfg, "transvg")
        assert train_process(folder).returncode == 0
        reference = load_checkpoint(ckpt / LAST)
        shutil.rmtree(ckpt)
        t0 = time.perf_counter()
        killed = train_process(folder, kill_at_item=6 * cfg.train.batch_size + 3)  # mid-epoch 1, step 7
        at = load_checkpoint(ckpt / LAST)
        done = train_process(folder)
        lost = differences(reference, load_checkpoint(ckpt / LAST))
        record("kill -9 mid-epoch", killed.returncode == -signal.SIGKILL and done.returncode == 0 and lost == 0, lost,
               f"resumed at epoch {at['epoch'] + 1} step {at['progress']['step']}, "
               f"{6 - at['progress']['step']} step(s) redone, bitwise equal end ({time.perf_counter() - t0:.0f} s)")

        shutil.rmtree(ckpt)
        killed = train_process(folder, kill_in_write=5)  # half-way through writing the first epoch-2 checkpoint
        partial = list(ckpt.glob(".last.pt.*.tmp"))
        at = load_checkpoint(ckpt / LAST)  # must still be the previous, whole one
        done = train_process(folder)
        lost = differences(reference, load_checkpoint(ckpt / LAST))
        record("kill -9 during a checkpoint write", killed.returncode == -signal.SIGKILL and bool(partial)
               and done.returncode == 0 and lost == 0, lost,
               f"killed writing last.pt at the end of epoch 1: half-written temp left, last.pt intact (epoch "
               f"{at['epoch'] + 1} step {at['progress']['step']}), resumed, bitwise equal end")


def non_finite(base: Path) -> None:
    with workdir(base, "nan") as folder:
        cfg, model, data = small_training(folder, train={"max_bad_steps": 3})  # 2 epochs x 4 steps
        logging.getLogger("refvg.engine.trainer").setLevel(logging.ERROR)  # the per-step warnings are the point, not output
        m = model()
        poison_loss(m, {2, 3, 6}, "loss")
        poison_loss(m, {7}, "grad")
        result = train(m, data, cfg, folder / "burst", method="t", evaluate=lambda _: {"acc@0.5": 0.0})
        updates = int(load_checkpoint(folder / "burst" / LAST)["optimizer"]["state"][0]["step"])
        finite = all(torch.isfinite(p).all() for p in m.parameters())
        record("NaN/inf loss or gradient (4 of 8 steps)", result.skipped_steps == 4 and updates == 4 and finite, 0,
               f"{result.skipped_steps} steps skipped and counted, {updates} updates, weights finite")

        m = model()
        poison_loss(m, set(range(3, 100)), "loss")
        try:
            train(m, data, cfg, folder / "diverge", method="t", evaluate=lambda _: {"acc@0.5": 0.0})
            stopped = ""
        except NonFiniteLossError as err:
            stopped = str(err)
        state = load_checkpoint(folder / "diverge" / LAST)
        good = int(state["optimizer"]["state"][0]["step"]) == 2 and all(
            torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
        record("NaN loss from step 3 on (divergence)", bool(stopped) and good, 0 if good else 1,
               "stopped after train.max_bad_steps=3 in a row; last.pt = the state after the last good step")


# ---------------------------------------------------------------- inputs


def hostile_inputs(base: Path) -> None:
    raw = base / "tiny" / "data" / "raw" / "refshapes"
    refs = load_refs(raw / "refs(unc).p")
    instances = json.loads((raw / "instances.json").read_text())
    total = sum(len(r["sentences"]) for r in refs)

    marker = base / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = base / "evil"
    evil.mkdir()
    shutil.copy(raw / "instances.json", evil / "instances.json")
    (evil / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 0, "x": Payload()}], protocol=2))
    try:
        ReferDataset(base, "evil")
        refused = False
    except BadRecordError:
        refused = True
    record("refs pickle carrying os.system", refused and not marker.exists(), 0, "refused, nothing executed")

    torch.save({"format": "refvg-checkpoint-v1", "model": Payload()}, base / "evil.pt")
    try:
        stages.load_trained(base / "evil.pt")
        refused = False
    except CheckpointError:
        refused = True
    record("checkpoint that is not ours", refused and not marker.exists(), 0, "CheckpointError naming the file")

    def reader_case(label: str, name: str, corrupt, reasons: set[str]) -> None:
        r, i = copy.deepcopy(refs), copy.deepcopy(instances)
        bad_samples = corrupt(r, i)  # the samples the fault makes unusable; every other one must survive
        d = base / name
        d.mkdir()
        (d / "instances.json").write_text(json.dumps(i))
        (d / "refs(unc).json").write_text(json.dumps(r))
        ds = ReferDataset(base, name, image_dir=raw / "images")
        kept = sum(map(len, ds.all_samples().values()))
        lost = total - bad_samples - kept
        record(label, set(ds.skips.counts) == reasons and lost == 0, lost,
               f"{ds.skips.total} counted skip(s): {ds.skips.counts}")

    def escape(r, i):
        next(im for im in i["images"] if im["id"] == r[0]["image_id"])["file_name"] = "../../../etc/passwd"
        return sum(len(ref["sentences"]) for ref in r if ref["image_id"] == r[0]["image_id"])

    def expressions(r, i):
        r[0]["sentences"][0]["sent"] = "x" * 6_000_000
        r[1]["sentences"][0]["sent"] = "caf\udce9 circle"  # a byte that was not UTF-8 (surrogateescape)
        return 2

    reader_case("image path escaping the root (../../../etc/passwd)", "escape", escape, {"unsafe_image_path"})
    reader_case("non-UTF-8 and 6 MB expressions", "expressions", expressions,
                {"expression_too_long", "non_utf8_expression"})

    with workdir(base, "jpeg") as folder:
        (folder / "data").unlink()  # a copy of the raw data to damage, not the shared link
        shutil.copytree(base / "tiny" / "data" / "raw", folder / "data" / "raw")
        victim = instances["images"][0]
        png = folder / "data/raw/refshapes/images" / victim["file_name"]
        png.with_suffix(".jpg").write_bytes(truncated_jpeg(png, 0.6))
        png.unlink()
        inst = copy.deepcopy(instances)
        inst["images"][0]["file_name"] = png.with_suffix(".jpg").name
        (folder / "data/raw/refshapes/instances.json").write_text(json.dumps(inst))
        manifest = prepare_dataset(load_config("params.yaml"))
        baseline = read_manifest(base / "tiny" / "data/prepared/refshapes")
        on_victim = sum(len(r["sentences"]) for r in refs if r["image_id"] == victim["id"])
        count = lambda m: sum(c["samples"] for c in m["splits"].values())  # noqa: E731
        lost = count(baseline) - count(manifest) - on_victim
        record("truncated JPEG", manifest["skipped"]["counts"].get("corrupt_image", 0) >= 1 and lost == 0, lost,
               f"counted skip of its {on_victim} samples ({manifest['skipped']['counts']})")

    bad = base / "bad_params.yaml"
    rejected = 0
    for text in ("train:\n  lrr: 0.1\n", "train:\n  epochs: many\n", "train:\n  lr: 0.1\n  lr: 0.2\n",
                 "train:\n  epochs: yes\n", "train:\n  lr: .inf\n"):
        bad.write_text(text)
        try:
            load_config(bad)
        except ConfigError:
            rejected += 1
    record("params.yaml: unknown key, wrong types, duplicate key, bool, inf", rejected == 5, 0,
           f"{rejected}/5 rejected with the key path named")


# ---------------------------------------------------------------- services


def tracking_faults(base: Path) -> None:
    with workdir(base, "mlflow", tracking={"http_retries": 1, "http_timeout_s": 5,
                                           "unlogged_dir": str(base / "unlogged")}):
        cfg = load_config("params.yaml")
        blocker, uri = blocked_sqlite_store(base)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        with stage_run(cfg, "train@transvg", params={"train": cfg.train.model_dump(mode="json")}) as tracker:
            result = stages.train_method(cfg, "transvg", on_epoch_end=lambda m, e: tracker.log_metrics(m, step=e))
        saved = list((base / "unlogged").glob("*.json"))
        blocker.unlink()
        replayed = all(replay(p) for p in saved)
        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("refvg").experiment_id],
                                   filter_string="tags.`refvg.stage` = 'train@transvg'")
        lost = len(result.history) - len(client.get_metric_history(run.info.run_id, "train/loss"))
        ok = (stages.checkpoint_dir(cfg, "transvg") / BEST).exists()
        record("MLflow store unreachable at start", ok and replayed and lost == 0, lost,
               f"training completed, {len(saved)} file of unlogged calls, replayed once the store was back")

        shutil.rmtree(stages.checkpoint_dir(cfg, "transvg"))
        with MlflowServer(base / "server") as server:
            os.environ["MLFLOW_TRACKING_URI"] = server.uri
            with stage_run(cfg, "train@transvg", params={"train": cfg.train.model_dump(mode="json")}) as tracker:
                on_epoch_end, stalls = log_then_kill_server(tracker, server, kill_after_epoch=1)
                result = stages.train_method(cfg, "transvg", on_epoch_end=on_epoch_end)
            saved = [p for p in (base / "unlogged").glob("*.json") if tracker.run_id in p.name]
            server.start()
            replayed = all(replay(p) for p in saved)
            client = MlflowClient(server.uri)
            lost = len(result.history) - len(client.get_metric_history(tracker.run_id, "train/loss"))
            ok = load_checkpoint(stages.checkpoint_dir(cfg, "transvg") / LAST)["epoch"] == cfg.train.epochs
            record("MLflow server killed mid-run", ok and replayed and lost == 0, lost,
                   f"training went on (epoch with the dead server: +{stalls[1]:.1f} s of logging), checkpoints "
                   f"whole, missed calls saved and replayed")

    store = base / "shared"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlruns.db'}"}
    folders = []
    for name, lr in (("p1", 0.001), ("p2", 0.002)):
        folders.append(base / name)
        folders[-1].mkdir()
        write_params(folders[-1], train={"lr": lr})
    procs = [log_process(f, stage, 10, env) for f in folders for stage in ("train@a", "train@b")]
    outs = [p.communicate(timeout=600) for p in procs]
    failures = sum(p.returncode != 0 or json.loads(o)["failures"] > 0 for p, (o, _) in zip(procs, outs))
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("refvg").experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("refvg.kind") == "stage"]
    lost = 4 * 10 - sum(len(client.get_metric_history(r.info.run_id, "loss")) for r in stage_runs)
    locked = sum("locked" in e for _, e in outs)
    record("2 pipelines x 2 stages on one fresh sqlite store", failures == 0 and lost == 0 and locked == 0, lost,
           f"{len(stage_runs)} runs, {locked} 'database is locked', "
           f"{sum(r.data.tags.get('refvg.kind') == 'pipeline' for r in runs)} parent runs")


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="refvg-faults-") as tmp:
        base = Path(tmp)
        (base / "tiny").mkdir()
        os.chdir(base / "tiny")
        cfg = load_config(write_params(base / "tiny"))
        stages.generate(cfg)
        stages.prepare(cfg)
        t0 = time.perf_counter()
        for group in (kill_and_resume, non_finite, hostile_inputs, tracking_faults):
            print(f"{group.__name__}:", flush=True)
            group(base)
        os.chdir(ROOT)
    recovered = sum(r["recovered"] for r in RESULTS)
    lost = sum(r["lost"] for r in RESULTS)
    print(f"\nfaults injected: {len(RESULTS)}\nruns recovered:  {recovered}/{len(RESULTS)}\ndata lost:       {lost}"
          f"\n({time.perf_counter() - t0:.0f} s)")
    sys.exit(0 if recovered == len(RESULTS) and lost == 0 else 1)


if __name__ == "__main__":
    main()
