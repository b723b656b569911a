"""The pipeline's stages as Prefect flows: thin wrappers that call `refvg.stages` and log to MLflow.

Each flow returns a small dict (what it wrote, its figures, and `work_seconds`: the time spent in
the library's data work and model compute, which the overhead benchmark subtracts from wall time).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from flows import runtime  # noqa: F401  (telemetry off before prefect is imported)
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from refvg import stages
from refvg.config import Config, load_config
from refvg.data.text import TOKENIZER_DIR
from refvg.tracking import Tracker, display_uri, stage_run

log = logging.getLogger("refvg.flows.stages")


@task(cache_policy=NO_CACHE)
def work(fn, *args, **kwargs):
    """Data work or model compute. Not retried: a failure there is a bug or bad data, and a repeat
    hides it."""
    return fn(*args, **kwargs)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def transfer(fn, *args, **kwargs):
    """Moving files to the tracking store, which can blip: retried."""
    return fn(*args, **kwargs)


def upload(fn, *args, name: str) -> None:
    """Run a transfer; if it still fails after its retries, report it and let the stage finish (its
    outputs are on disk and in DVC already)."""
    state = transfer.with_options(name=name)(fn, *args, return_state=True)
    if state.is_failed():
        log.warning("%s failed after retries: %s", name, state.message)


def log_files(tracker: Tracker, paths: list[Path]) -> None:
    def _all():
        for p in paths:
            tracker.log_artifact(p)

    upload(_all, name="log-artifacts")


@flow(name="generate")
def generate_flow(params: str = "params.yaml") -> dict:
    cfg = load_config(params)
    with stage_run(
        cfg, "generate", params={"synthetic": cfg.synthetic.model_dump(mode="json")}
    ) as tracker:
        t0 = time.perf_counter()
        summary = work.with_options(name="generate-refshapes")(stages.generate, cfg)
        seconds = time.perf_counter() - t0
        tracker.log_metrics({"generate_seconds": seconds, **_numbers(summary)})
    return {"summary": summary, "work_seconds": seconds}


@task(cache_policy=NO_CACHE, task_run_name="letterbox-{shard.split}-{shard.index}")
def prepare_shard(fn, shard):
    """One shard of prepare's image work (refvg.data.prepare.letterbox_shard); mapped over the
    shards."""
    return fn(shard)


def shard_task_runner(cfg: Config):
    """Where prepare's shards run: Dask worker processes when prefect-dask is installed (or asked
    for), else Prefect's thread pool."""
    p = cfg.parallel
    if p.prepare_runner in ("auto", "dask"):
        # Dask logs every worker start and stop at INFO; the stage log keeps to what matters (its
        # workers read this too, being started after it is set).
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            if p.prepare_runner == "dask":
                raise RuntimeError(
                    "parallel.prepare_runner is 'dask' but prefect-dask is not installed: "
                    "pip install -c constraints.txt -e '.[dask]'"
                ) from None
        else:
            return DaskTaskRunner(
                cluster_kwargs={
                    "n_workers": p.prepare_workers,
                    "threads_per_worker": 1,
                    "processes": True,
                    "dashboard_address": None,
                }
            )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=p.prepare_workers)


def run_shards_mapped(cfg: Config):
    """A `run_shards` for refvg.data.prepare: the shards as mapped Prefect tasks on
    `shard_task_runner`."""
    from prefect import unmapped

    def run(fn, shards):
        with shard_task_runner(cfg) as runner:
            return runner.map(prepare_shard, {"fn": unmapped(fn), "shard": shards}).result()

    return run


@flow(name="prepare")
def prepare_flow(params: str = "params.yaml") -> dict:
    cfg = load_config(params)
    with stage_run(
        cfg,
        "prepare",
        params={
            "data": cfg.data.model_dump(mode="json"),
            "parallel": cfg.parallel.model_dump(mode="json"),
        },
    ) as tracker:
        t0 = time.perf_counter()
        if cfg.parallel.prepare_shards > 1:  # the shards are the tasks; a failed one fails the flow
            manifest = stages.prepare(cfg, run_shards=run_shards_mapped(cfg))
        else:
            manifest = work.with_options(name="prepare-dataset", retries=1)(stages.prepare, cfg)
        seconds = time.perf_counter() - t0
        counts = {
            f"{split}.{k}": v for split, c in manifest["splits"].items() for k, v in c.items()
        }
        tracker.log_metrics(
            {
                **counts,
                "skipped.total": manifest["skipped"]["total"],
                **{f"skipped.{r}": n for r, n in manifest["skipped"]["counts"].items()},
                "prepare_seconds": seconds,
            }
        )
        log_files(tracker, [stages.prepared_manifest(cfg)])
    return {"manifest": manifest, "work_seconds": seconds}


@flow(name="detections")
def detections_flow(params: str = "params.yaml") -> dict:
    cfg = load_config(params)
    with stage_run(
        cfg, "detections", params={"detections": cfg.detections.model_dump(mode="json")}
    ) as tracker:
        t0 = time.perf_counter()
        summary = work.with_options(name="stand-in-detections")(stages.detections, cfg)
        seconds = time.perf_counter() - t0
        tracker.log_metrics({"detections_seconds": seconds, **_numbers(summary)})
        log_files(tracker, [summary["file"]])
    return {"summary": summary, "work_seconds": seconds}


@flow(name="train")
def train_flow(method: str, params: str = "params.yaml") -> dict:
    cfg = load_config(params)
    run_cfg = cfg.for_method(method)
    with stage_run(
        cfg,
        f"train@{method}",
        run_name=f"train {method}",
        params={
            "method": cfg.declared_methods[method].model_dump(mode="json"),
            **run_cfg.model_dump(mode="json"),
        },
    ) as tracker:
        result = work.with_options(name=f"train-{method}")(
            stages.train_method,
            cfg,
            method,
            on_epoch_end=lambda m, epoch: tracker.log_metrics(m, step=epoch),
        )
        best = f"best_val_{result.select_metric}".replace(
            "@", "_at_"
        )  # weak methods: a box-free metric
        tracker.log_metrics(
            {
                best: result.best_score,
                "best_epoch": result.best_epoch,
                "train_samples_per_second": result.samples_per_second,
            }
        )
        model_uri = transfer.with_options(name="log-model")(
            tracker.log_model,
            result.best_checkpoint,
            result.checkpoint_dir / TOKENIZER_DIR,
            return_state=True,
        )
        if model_uri.is_failed():
            log.warning("log-model failed after retries: %s", model_uri.message)
        else:  # a new version per training run: models:/refvg-<method>/<n>
            upload(
                tracker.register_model,
                model_uri.result(),
                f"refvg-{method}",
                {
                    "val_acc_at_0.5": result.best_score,
                    "best_epoch": result.best_epoch,
                    "method": method,
                },
                name="register-model",
            )
    return {
        "best_score": result.best_score,
        "best_epoch": result.best_epoch,
        "samples_per_second": result.samples_per_second,
        "work_seconds": result.compute_seconds,
    }


@flow(name="pretrain")
def pretrain_flow(params: str = "params.yaml") -> dict:
    """The pretrained backbones and text encoder every method starts from: its own MLflow run
    (per-epoch training losses, the held-out figures of each model against its trivial baseline),
    metrics.json as an artifact."""
    cfg = load_config(params)
    with stage_run(
        cfg, "pretrain", params={"pretrain": cfg.pretrain.model_dump(mode="json")}
    ) as tracker:
        result = work.with_options(name="pretrain")(
            stages.pretrain, cfg, on_epoch_end=lambda m, epoch: tracker.log_metrics(m, step=epoch)
        )
        tracker.log_metrics(
            {
                **{
                    f"final/{model}/{k}": v
                    for model, figures in result.items()
                    if isinstance(figures, dict)
                    for k, v in figures.items()
                },
                "pretrain_seconds": result["seconds"],
            }
        )
        log_files(tracker, [Path(result["out_dir"]) / "metrics.json"])
    return {**result, "work_seconds": result["seconds"]}


@flow(name="teacher")
def teacher_flow(params: str = "params.yaml") -> dict:
    """The CLIP teacher the distilling methods learn from: its own MLflow run (per-epoch contrastive
    loss, retrieval recall on its caption corpus's held-out images and on val), the model folder and
    the features' manifest as artifacts."""
    cfg = load_config(params)
    with stage_run(
        cfg, "teacher", params={"teacher": cfg.teacher.model_dump(mode="json")}
    ) as tracker:
        result = work.with_options(name="teacher")(
            stages.teacher, cfg, on_epoch_end=lambda m, epoch: tracker.log_metrics(m, step=epoch)
        )
        tracker.log_metrics(
            {
                **{f"final_val/{k}": v for k, v in result["val"].items()},
                **{f"final_corpus/{k}": v for k, v in result["corpus"].items()},
                "teacher_seconds": result["seconds"],
            }
        )
        out = Path(result["out_dir"])
        log_files(tracker, [out / "features" / "manifest.json"])
        if (out / "model").exists():  # not when no method distils
            upload(
                tracker.log_artifact, out / "model", "teacher", name="log-teacher"
            )  # save_pretrained folder
    return {
        "val": result["val"],
        "corpus": result["corpus"],
        "out_dir": result["out_dir"],
        "work_seconds": result["seconds"],
    }


@flow(name="evaluate")
def evaluate_flow(method: str, params: str = "params.yaml") -> dict:
    cfg = load_config(params)
    with stage_run(
        cfg,
        f"evaluate@{method}",
        run_name=f"evaluate {method}",
        params={"method": method, "eval": cfg.eval.model_dump(mode="json")},
    ) as tracker:
        rep = work.with_options(name=f"evaluate-{method}")(stages.evaluate_method, cfg, method)
        tracker.log_metrics(
            {f"{split}.{k}": v for split, m in rep.metrics.items() for k, v in m.items()}
        )
        log_files(tracker, [rep.metrics_path, *rep.figures, *rep.plot_data])
    return {"metrics": rep.metrics, "work_seconds": rep.seconds}


@flow(name="report")
def report_flow(params: str = "params.yaml") -> dict:
    cfg = load_config(params)
    with stage_run(cfg, "report") as tracker:
        t0 = time.perf_counter()
        summary = work.with_options(name="write-report")(stages.report, cfg)
        seconds = time.perf_counter() - t0
        files = [summary, summary.with_name("comparison.png")]
        log_files(tracker, files)
        report_on_parent(tracker, cfg, files)
    print(summary.read_text())
    uri = display_uri(tracker.spec["uri"])  # no user:password@
    print(
        f"metrics: {cfg.eval.metrics_dir}/<method>.json (dvc metrics "
        f"show), plots: {cfg.eval.plots_dir}/<method>/, "
        f"report: {summary}\nMLflow runs: {uri} (browse: mlflow ui --backend-store-uri {uri}, "
        f"then http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning)"
    )
    return {"summary": str(summary), "work_seconds": seconds}


NOTE_LIMIT = 8000  # MLflow's longest tag value


def report_on_parent(tracker: Tracker, cfg: Config, files: list[Path]) -> None:
    """The run a user lands on tells the whole story: the pipeline's parent run gets the summary
    table (as its description, which MLflow shows on the run's page, and as a file), the comparison
    figure, and each method's headline figures as metrics (to compare pipelines, e.g. DVC
    experiments, side by side)."""
    text = files[0].read_text()
    if len(text) > NOTE_LIMIT:
        text = text[: NOTE_LIMIT - 60] + "\n\n(truncated: the whole table is report/summary.md)\n"
    tracker.set_tags({"mlflow.note.content": text}, parent=True)
    figures = {}
    for method in cfg.all_methods:
        path = Path(cfg.eval.metrics_dir) / f"{method}.json"
        if path.exists():
            splits = json.loads(path.read_text()).get("splits", {})
            for split, m in splits.items():
                if isinstance(m, dict) and "acc@0.5" in m:
                    figures[f"{method}.{split}.acc_at_0.5"] = m["acc@0.5"]
    tracker.log_parent_metrics(figures)

    def _all():
        for p in files:
            tracker.log_artifact(p, "report", parent=True)

    upload(_all, name="log-report-on-parent")


def _numbers(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def cfg_methods(params: str) -> list[str]:
    cfg: Config = load_config(params)
    return list(cfg.all_methods)
