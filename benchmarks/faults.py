"""Injects every fault of the reliability issue into a tiny refvg setup and prints, per fault, what
happened: injected, recovered (the run ended in its designed safe state: resumed or completed, or
stopped / refused with the input named), and data lost (must be 0).

    python benchmarks/faults.py  # ~2.5 min on 2 quiet cores, 12 min loaded (2 MLflow servers)

Data lost, per fault: training — tensors and per-epoch results that differ from an uninterrupted run
with the same seed (bitwise), plus 1 if a kill between the epoch end's writes left a best.pt that is
not the best epoch last.pt names (or one while it names none); non-finite steps — good steps whose
update is missing, epochs missing from the history, non-finite tensors, and (divergence) tensors of
last.pt that differ from the clean run's state after the same good steps; inputs — good records
dropped besides the bad one; refused files (pickle, checkpoint, params) — files of the folder
changed or removed by the attempt, and messages that do not name the file or key they claim to;
tracking — logged values missing from the store once it is back (after `python -m refvg.tracking
replay` where the stage ended while it was down).

    python benchmarks/faults.py non_finite hostile_inputs   # only these groups
The injectors are the tests' (tests/faults.py); the tests assert the same behaviour case by case.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
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
from refvg.engine.checkpoint import CheckpointError, load_checkpoint, load_trained  # noqa: E402
from refvg.engine.trainer import BEST, LAST, NonFiniteLossError, train  # noqa: E402
from refvg.engine.hooks import NEXT_BEST  # noqa: E402
from refvg.tracking import replay, stage_run  # noqa: E402
from tests.conftest import write_params  # noqa: E402
from tests.faults import (  # noqa: E402
    MlflowServer,
    blocked_sqlite_store,
    log_process,
    log_then_kill_server,
    poison_loss,
    small_training,
    train_process,
    truncated_jpeg,
)

RESULTS: list[dict] = []
TIMINGS = ("samples_per_second", "epoch_seconds")


def record(fault: str, recovered: bool, lost: int, note: str) -> None:
    RESULTS.append({"fault": fault, "recovered": recovered, "lost": lost, "note": note})
    print(
        f"  {fault}: {'recovered' if recovered else 'NOT RECOVERED'}, data lost {lost} — {note}",
        flush=True,
    )


def differences(reference: dict, state: dict) -> int:
    """Tensors of the final weights and per-epoch results that differ from the uninterrupted run."""
    weights = sum(
        not torch.equal(reference["model"][k], state["model"][k]) for k in reference["model"]
    )
    strip = lambda hist: [{k: v for k, v in h.items() if k not in TIMINGS} for h in hist]  # noqa: E731
    epochs = sum(a != b for a, b in zip(strip(reference["history"]), strip(state["history"])))
    return weights + epochs + abs(len(reference["history"]) - len(state["history"]))


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def changed(before: dict[str, str], folder: Path) -> int:
    """Files of `before` that are gone or different in `folder` now."""
    after = snapshot(folder)
    return sum(after.get(name) != digest for name, digest in before.items())


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


def _point(state: dict) -> str:
    """Where a last.pt resumes, in words: an epoch's end, or a step in the next epoch (1-based)."""
    epoch, step = state["epoch"], state["progress"]["step"]
    return f"epoch {epoch + 1} step {step}" if step else f"the end of epoch {epoch}"


def kill_and_resume(base: Path) -> None:
    with workdir(base, "kill", train={"checkpoint_every_steps": 4}) as folder:
        cfg = load_config("params.yaml")
        ckpt = stages.checkpoint_dir(cfg, "transvg")
        assert train_process(folder).returncode == 0
        reference = load_checkpoint(ckpt / LAST)
        shutil.rmtree(ckpt)
        t0 = time.perf_counter()
        killed = train_process(
            folder, kill_at_item=6 * cfg.train.batch_size + 3
        )  # mid-epoch 1, step 7
        at = load_checkpoint(ckpt / LAST)
        done = train_process(folder)
        lost = differences(reference, load_checkpoint(ckpt / LAST))
        record(
            "kill -9 mid-epoch",
            killed.returncode == -signal.SIGKILL and done.returncode == 0 and lost == 0,
            lost,
            f"resumed from {_point(at)}, "
            f"{6 - at['progress']['step']} step(s) redone, bitwise equal "
            f"end ({time.perf_counter() - t0:.0f} s)",
        )

        shutil.rmtree(ckpt)
        killed = train_process(
            folder, kill_in_write=5
        )  # half-way through writing the first epoch-2 checkpoint
        partial = list(ckpt.glob(".last.pt.*.tmp"))
        at = load_checkpoint(ckpt / LAST)  # must still be the previous, whole one
        done = train_process(folder)
        lost = differences(reference, load_checkpoint(ckpt / LAST))
        record(
            "kill -9 during a checkpoint write",
            killed.returncode == -signal.SIGKILL
            and bool(partial)
            and done.returncode == 0
            and lost == 0,
            lost,
            f"killed half-way through the 5th checkpoint write (epoch 2's first last.pt): "
            f"half-written temp left, last.pt intact ({_point(at)}), resumed, bitwise equal end",
        )

        shutil.rmtree(ckpt)
        killed = train_process(
            folder, kill_after_validation_write=1
        )  # between epoch 1's two end writes
        on_disk = {
            name: load_checkpoint(ckpt / name)["epoch"]
            for name in (LAST, BEST, NEXT_BEST)
            if (ckpt / name).exists()
        }
        recorded = load_checkpoint(ckpt / LAST)["best_epoch"]
        # best.pt is the epoch last.pt names as the best, and absent while it names none
        consistent = on_disk.get(BEST) == (recorded if recorded >= 1 else None)
        done = train_process(folder)
        lost = differences(reference, load_checkpoint(ckpt / LAST)) + (not consistent)
        record(
            "kill -9 between best.pt and last.pt",
            killed.returncode == -signal.SIGKILL and done.returncode == 0 and lost == 0,
            lost,
            f"killed after epoch 1's first end write: epochs done per "
            f"file {on_disk}, last.pt names "
            f"{f'best epoch {recorded}' if recorded >= 1 else 'no best epoch'}"
            f"{'' if consistent else ', disagreeing with best.pt'}; "
            f"rerun resumed, bitwise equal end",
        )

        shutil.rmtree(ckpt)
        killed = train_process(folder, kill_in_validation=2)  # epoch 2's validation
        at = load_checkpoint(ckpt / LAST)
        done = train_process(folder)
        lost = differences(reference, load_checkpoint(ckpt / LAST))
        record(
            "kill -9 during validation",
            killed.returncode == -signal.SIGKILL and done.returncode == 0 and lost == 0,
            lost,
            f"killed in epoch 2's validation: resumed from {_point(at)}, "
            f"the epoch finished and validated again, bitwise equal end",
        )


def non_finite(base: Path) -> None:
    with workdir(base, "nan") as folder:
        cfg, model, data = small_training(folder, train={"max_bad_steps": 3})  # 2 epochs x 4 steps
        logging.getLogger("refvg.engine.trainer").setLevel(
            logging.ERROR
        )  # the per-step warnings are the point, not output
        evaluate = lambda _: {"acc@0.5": 0.0}  # noqa: E731
        # The clean baseline: the same run, nothing poisoned; its state before step 3 (after 2
        # updates, BatchNorm statistics included) is what the divergence case must keep.
        clean, before_step3, forwards = model(), {}, [0]

        def before_forward(
            module, _args
        ):  # before step 3's forward: its BatchNorm statistics not yet moved
            forwards[0] += 1
            if forwards[0] == 3:
                before_step3.update({k: v.detach().clone() for k, v in module.state_dict().items()})

        clean.register_forward_pre_hook(before_forward)
        baseline = train(clean, data, cfg, folder / "clean", method="t", evaluate=evaluate)
        clean_updates = int(
            load_checkpoint(folder / "clean" / LAST)["optimizer"]["state"][0]["step"]
        )

        m = model()
        poisoned = {2, 3, 6, 7}
        poison_loss(m, {2, 3, 6}, "loss")
        poison_loss(m, {7}, "grad")
        result = train(m, data, cfg, folder / "burst", method="t", evaluate=evaluate)
        state = load_checkpoint(folder / "burst" / LAST)
        updates = int(state["optimizer"]["state"][0]["step"])
        non_finite = sum(
            not torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()
        )
        lost = (
            abs(clean_updates - len(poisoned) - updates)
            + non_finite
            + abs(len(baseline.history) - len(result.history))
            + abs(result.skipped_steps - len(poisoned))
        )
        record(
            "NaN/inf loss or gradient (4 of 8 steps)",
            lost == 0,
            lost,
            f"{result.skipped_steps} steps skipped and counted, {updates} "
            f"of the clean run's {clean_updates} "
            f"updates less the {len(poisoned)} bad ones, {len(result.history)} epochs recorded, "
            f"{non_finite} non-finite tensors",
        )

        m = model()
        poison_loss(m, set(range(3, 100)), "loss")
        try:
            train(m, data, cfg, folder / "diverge", method="t", evaluate=evaluate)
            stopped = ""
        except NonFiniteLossError as err:
            stopped = str(err)
        state = load_checkpoint(folder / "diverge" / LAST)
        updates = int(state["optimizer"]["state"][0]["step"])
        differ = [k for k, v in state["model"].items() if not torch.equal(before_step3[k], v)]
        if differ:
            print(f"    differing from the clean state: {differ}", flush=True)
        lost = abs(2 - updates) + len(differ)
        named = "max_bad_steps" in stopped
        record(
            "NaN loss from step 3 on (divergence)",
            bool(stopped) and named and lost == 0,
            lost,
            f"stopped after train.max_bad_steps=3 in a row (message names "
            f"the knob: {named}); last.pt holds "
            f"{updates} updates, its tensors compared bitwise with the "
            f"clean run's after the same 2 steps",
        )


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
    before = snapshot(evil)
    message = ""
    try:
        ReferDataset(base, "evil")
    except BadRecordError as err:
        message = str(err)
    lost = changed(before, evil)
    named = str(evil / "refs(unc).p") in message
    record(
        "refs pickle carrying os.system",
        bool(message) and named and not marker.exists() and lost == 0,
        lost,
        f"refused naming the file: {named}; nothing executed: {not marker.exists()}; "
        f"{lost} file(s) changed",
    )

    ckpt_dir = base / "evil_ckpt"
    ckpt_dir.mkdir()
    torch.save({"format": "refvg-checkpoint-v1", "model": Payload()}, ckpt_dir / "best.pt")
    before = snapshot(ckpt_dir)
    message = ""
    try:
        load_trained(ckpt_dir / "best.pt")
    except CheckpointError as err:
        message = str(err)
    lost = changed(before, ckpt_dir)
    named = str(ckpt_dir / "best.pt") in message
    record(
        "checkpoint that is not ours",
        bool(message) and named and not marker.exists() and lost == 0,
        lost,
        f"CheckpointError naming the file: {named}; nothing executed: {not marker.exists()}; "
        f"{lost} file(s) changed",
    )

    def reader_case(label: str, name: str, corrupt, reasons: set[str]) -> None:
        r, i = copy.deepcopy(refs), copy.deepcopy(instances)
        bad_samples = corrupt(
            r, i
        )  # the samples the fault makes unusable; every other one must survive
        d = base / name
        d.mkdir()
        (d / "instances.json").write_text(json.dumps(i))
        (d / "refs(unc).json").write_text(json.dumps(r))
        ds = ReferDataset(base, name, image_dir=raw / "images")
        kept = sum(map(len, ds.all_samples().values()))
        lost = total - bad_samples - kept
        record(
            label,
            set(ds.skips.counts) == reasons and lost == 0,
            lost,
            f"{ds.skips.total} counted skip(s): {ds.skips.counts}",
        )

    def escape(r, i):
        next(im for im in i["images"] if im["id"] == r[0]["image_id"])["file_name"] = (
            "../../../etc/passwd"
        )
        return sum(len(ref["sentences"]) for ref in r if ref["image_id"] == r[0]["image_id"])

    def expressions(r, i):
        r[0]["sentences"][0]["sent"] = "x" * 6_000_000
        r[1]["sentences"][0]["sent"] = (
            "caf\udce9 circle"  # a byte that was not UTF-8 (surrogateescape)
        )
        return 2

    reader_case(
        "image path escaping the root (../../../etc/passwd)",
        "escape",
        escape,
        {"unsafe_image_path"},
    )
    reader_case(
        "non-UTF-8 and 6 MB expressions",
        "expressions",
        expressions,
        {"expression_too_long", "non_utf8_expression"},
    )

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
        record(
            "truncated JPEG",
            manifest["skipped"]["counts"].get("corrupt_image", 0) >= 1 and lost == 0,
            lost,
            f"counted skip of its {on_victim} samples ({manifest['skipped']['counts']})",
        )

    # Each bad params.yaml with what its message must name: the key path (or, for a duplicate key,
    # which the YAML parser reports before any path exists, the key and its line).
    cases = [
        ("train:\n  lrr: 0.1\n", ["train.lrr"]),
        ("train:\n  epochs: many\n", ["train.epochs"]),
        ("train:\n  lr: 0.1\n  lr: 0.2\n", ["'lr'", "line 3"]),
        ("train:\n  epochs: yes\n", ["train.epochs"]),
        ("train:\n  lr: .inf\n", ["train.lr"]),
    ]
    params_dir = base / "params"
    params_dir.mkdir()
    rejected = named = lost = 0
    for i, (text, names) in enumerate(cases):
        bad = params_dir / f"bad{i}.yaml"
        bad.write_text(text)
        before = snapshot(params_dir)
        try:
            load_config(bad)
        except ConfigError as err:
            rejected += 1
            named += str(bad) in str(err) and all(n in str(err) for n in names)
        lost += changed(before, params_dir)
    record(
        "params.yaml: unknown key, wrong types, duplicate key, bool, inf",
        rejected == named == 5 and lost == 0,
        lost,
        f"{rejected}/5 rejected, {named}/5 naming the file and the "
        f"key path (duplicate: key and line)",
    )


# ---------------------------------------------------------------- services


def tracking_faults(base: Path) -> None:
    with workdir(
        base,
        "mlflow",
        tracking={"http_retries": 1, "http_timeout_s": 5, "unlogged_dir": str(base / "unlogged")},
    ):
        cfg = load_config("params.yaml")
        blocker, uri = blocked_sqlite_store(base)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        with stage_run(
            cfg, "train@transvg", params={"train": cfg.train.model_dump(mode="json")}
        ) as tracker:
            result = stages.train_method(
                cfg, "transvg", on_epoch_end=lambda m, e: tracker.log_metrics(m, step=e)
            )
        saved = list((base / "unlogged").glob("*.json"))
        blocker.unlink()
        replayed = all(replay(p) for p in saved)
        client = MlflowClient(uri)
        [run] = client.search_runs(
            [client.get_experiment_by_name("refvg").experiment_id],
            filter_string="tags.`refvg.stage` = 'train@transvg'",
        )
        lost = len(result.history) - len(client.get_metric_history(run.info.run_id, "train/loss"))
        ok = (stages.checkpoint_dir(cfg, "transvg") / BEST).exists()
        record(
            "MLflow store unreachable at start",
            ok and replayed and lost == 0,
            lost,
            f"training completed, {len(saved)} file of unlogged calls, "
            f"replayed once the store was back",
        )

        shutil.rmtree(stages.checkpoint_dir(cfg, "transvg"))
        with MlflowServer(base / "server") as server:
            os.environ["MLFLOW_TRACKING_URI"] = server.uri
            with stage_run(
                cfg, "train@transvg", params={"train": cfg.train.model_dump(mode="json")}
            ) as tracker:
                on_epoch_end, stalls = log_then_kill_server(tracker, server, kill_after_epoch=1)
                result = stages.train_method(cfg, "transvg", on_epoch_end=on_epoch_end)
            saved = [p for p in (base / "unlogged").glob("*.json") if tracker.run_id in p.name]
            server.start()
            replayed = all(replay(p) for p in saved)
            client = MlflowClient(server.uri)
            lost = len(result.history) - len(
                client.get_metric_history(tracker.run_id, "train/loss")
            )
            ok = (
                load_checkpoint(stages.checkpoint_dir(cfg, "transvg") / LAST)["epoch"]
                == cfg.train.epochs
            )
            record(
                "MLflow server killed mid-run",
                ok and replayed and lost == 0,
                lost,
                f"training went on (epoch with the dead server: "
                f"+{stalls[1]:.1f} s of logging), checkpoints "
                f"whole, missed calls saved and replayed",
            )

    store = base / "shared"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlruns.db'}"}
    folders = []
    for name, lr in (("p1", 0.001), ("p2", 0.002)):
        folders.append(base / name)
        folders[-1].mkdir()
        write_params(folders[-1], train={"lr": lr})
    procs = [log_process(f, stage, 10, env) for f in folders for stage in ("train@a", "train@b")]
    outs = [p.communicate(timeout=600) for p in procs]
    failures = sum(
        p.returncode != 0 or json.loads(o)["failures"] > 0 for p, (o, _) in zip(procs, outs)
    )
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("refvg").experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("refvg.kind") == "stage"]
    lost = 4 * 10 - sum(len(client.get_metric_history(r.info.run_id, "loss")) for r in stage_runs)
    locked = sum("locked" in e for _, e in outs)
    record(
        "2 pipelines x 2 stages on one fresh sqlite store",
        failures == 0 and lost == 0 and locked == 0,
        lost,
        f"{len(stage_runs)} runs, {locked} 'database is locked', "
        f"{sum(r.data.tags.get('refvg.kind') == 'pipeline' for r in runs)} parent runs",
    )


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
        groups = (kill_and_resume, non_finite, hostile_inputs, tracking_faults)
        chosen = sys.argv[1:] or [g.__name__ for g in groups]
        for group in (g for g in groups if g.__name__ in chosen):
            print(f"{group.__name__}:", flush=True)
            group(base)
        os.chdir(ROOT)
    recovered = sum(r["recovered"] for r in RESULTS)
    lost = sum(r["lost"] for r in RESULTS)
    print(
        f"\nfaults injected: {len(RESULTS)}\nruns recovered:  "
        f"{recovered}/{len(RESULTS)}\ndata lost:       {lost}"
        f"\n({time.perf_counter() - t0:.0f} s)"
    )
    sys.exit(0 if recovered == len(RESULTS) and lost == 0 else 1)


if __name__ == "__main__":
    main()
