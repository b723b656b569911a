"""The one module that talks to MLflow.

- Store: `MLFLOW_TRACKING_URI` when set, else `tracking.tracking_uri` of params.yaml (sqlite in the repo).
- Grouping: every stage of one pipeline run is a child of one parent run, found by a key made of the git
  commit and the params; so `dvc repro` (one process per stage) and `flows/pipeline.py` (one process) group
  the same way, and `dvc exp run -S train.lr=...` gets a parent of its own.
- Cost: metrics go in one `log_batch` per epoch, never one call per value.
- Faults: a tracking failure after the run has started is reported and counted, never raised into training
  (losing a metric is better than losing a run); failing to reach the store at start is reported the same
  way and the stage runs untracked.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from refvg.config import Config

log = logging.getLogger(__name__)

PIPELINE_TAG = "refvg.pipeline_key"
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "ITERATIVE_DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def disable_telemetry() -> None:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def git_commit(cwd: Path = Path(".")) -> tuple[str, bool]:
    """(commit, dirty); ("unknown", True) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", True


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def pipeline_key(cfg: Config, commit: str) -> str:
    blob = json.dumps({"commit": commit, "cfg": cfg.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Tracker:
    """A stage's MLflow run. All calls go through the client with an explicit run id, so Prefect's task
    threads never depend on MLflow's thread-local "active run"."""

    def __init__(self, client, run_id: Optional[str], failures: int = 0, s3=None):
        self.client, self.run_id, self.failures = client, run_id, failures
        self.s3 = s3  # refvg.storage.S3Location when artifacts may live in S3

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _safe(self, what: str, fn, *args, **kwargs):
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never kill a training run
            self.failures += 1
            log.warning("MLflow: could not %s (%s: %s); the run goes on", what, type(err).__name__, err)
            return None

    def end(self, status: str) -> None:
        if self.active:
            self._safe("end the run", self.client.set_terminated, self.run_id, status)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # the store's batch limit
            self._safe("log params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_at_"), float(v), now, step or 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float))]
        self._safe("log metrics", self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._safe("set tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # File transfers raise, unlike the calls above: the caller retries them and reports the final failure.
    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if not self.active:
            return
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, checkpoint: Path, tokenizer_dir: Path, name: str = "model") -> Optional[str]:
        """Log a pyfunc model (image + expression -> box) built from our checkpoint; returns its URI.

        The logged model is finalised READY only once every file is in the artifact store. An upload that
        fails (after the S3 client's retries) leaves it FAILED, with what it had uploaded deleted where the
        store still answers, and raises StorageError naming the destination: never a half-uploaded model
        that looks complete."""
        if not self.active:
            return None
        from mlflow.entities import LoggedModelStatus

        from refvg.mlflow_model import log_grounding_model
        from refvg.storage import StorageError, describe

        before = {m.model_id for m in self._run_models()}
        try:
            info = log_grounding_model(self.run_id, checkpoint, tokenizer_dir, name)
        except Exception as err:
            partial = [m for m in self._run_models() if m.model_id not in before]
            for m in partial:
                self._safe("mark a failed model upload", self.client.finalize_logged_model, m.model_id,
                           LoggedModelStatus.FAILED)
                self._discard(m.artifact_location)
            where = partial[0].artifact_location if partial else "the artifact store"
            raise StorageError(f"uploading model {name!r} of run {self.run_id} to {display_uri(where)} failed: "
                               f"{describe(err)}") from err
        self.client.finalize_logged_model(info.model_id, LoggedModelStatus.READY)
        return info.model_uri

    def _run_models(self) -> list:
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        found = self.client.search_logged_models(experiment_ids=[exp_id], filter_string=f"source_run_id = '{self.run_id}'")
        return list(found)

    def _discard(self, artifact_location: str) -> None:
        """Best effort: the store may be the thing that is down; the FAILED status is what readers check."""
        from refvg import storage

        if not artifact_location.startswith("s3://"):
            return
        try:
            if self.s3 is not None:
                n = storage.delete_prefix(self.s3, artifact_location)
                log.warning("deleted %d object(s) of the failed upload at %s", n, artifact_location)
        except Exception as err:  # noqa: BLE001 - cleanup of a failure must not mask it
            log.warning("could not delete the partial upload at %s (%s); it is marked FAILED",
                        artifact_location, storage.describe(err))


def display_uri(uri: str) -> str:
    """A store URI for logs and messages: any user:password@ part is masked."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=f"***@{host}"))
    return uri


def _client(cfg: Config):
    disable_telemetry()
    from refvg import storage

    storage.apply_client_env(cfg)  # MLflow's own boto3 client: our endpoint, region and retry policy
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri), uri


def _experiment_id(client, cfg: Config) -> str:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    from refvg import storage

    loc = storage.location(cfg)
    if loc is not None and loc.mlflow_artifacts:
        artifacts = loc.mlflow_url
    else:
        artifacts = Path(cfg.tracking.artifact_root).resolve().as_uri()
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
    except Exception:  # noqa: BLE001 - another stage created it between our two calls
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def _parent_run(client, exp_id: str, cfg: Config, key: str, commit: str, dirty: bool) -> str:
    found = client.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1,
                               order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"pipeline {commit[:8]}{'+dirty' if dirty else ''}",
                            tags={PIPELINE_TAG: key, "git.commit": commit, "git.dirty": str(dirty),
                                  "refvg.kind": "pipeline"})
    Tracker(client, run.info.run_id).log_params(cfg.model_dump(mode="json"))
    return run.info.run_id


@contextmanager
def stage_run(cfg: Config, stage: str, run_name: Optional[str] = None, params: Optional[dict] = None) -> Iterator[Tracker]:
    """A child run for one DVC/Prefect stage under the pipeline's parent run. Ends FINISHED, or FAILED with
    the exception re-raised."""
    commit, dirty = git_commit()
    try:
        client, uri = _client(cfg)
        exp_id = _experiment_id(client, cfg)
        parent = _parent_run(client, exp_id, cfg, pipeline_key(cfg, commit), commit, dirty)
        run = client.create_run(exp_id, run_name=run_name or stage, tags={
            "mlflow.parentRunId": parent, "refvg.stage": stage, "dvc.stage": stage,
            "git.commit": commit, "git.dirty": str(dirty), "refvg.kind": "stage"})
        from refvg import storage

        tracker = Tracker(client, run.info.run_id, s3=storage.location(cfg))
        log.info("MLflow run %s (stage %s) in %s", run.info.run_id, stage, display_uri(uri))
    except Exception as err:  # noqa: BLE001 - an unreachable store must not stop the stage
        log.warning("MLflow store unreachable (%s: %s); stage %s runs untracked", type(err).__name__, err, stage)
        tracker = Tracker(None, None, failures=1)
    if params:
        tracker.log_params(params)
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    if tracker.failures:
        log.warning("MLflow: %d tracking call(s) failed during stage %s", tracker.failures, stage)


def load_grounder(model_uri: str, cfg: Config):
    """A `Grounder` from an MLflow model: "models:/<name>/<version>", "models:/<model id>", "runs:/<run>/model",
    an s3:// or local MLflow model folder. Loaded through the pyfunc flavour (our weights-only checkpoint,
    nothing unpickled). A model whose upload did not complete is refused, with its status named."""
    client, uri = _client(cfg)
    import mlflow

    model_id = _logged_model_id(client, model_uri)
    if model_id is not None:
        status = str(client.get_logged_model(model_id).status)
        if status != "READY":
            raise ValueError(f"{model_uri}: logged model {model_id} is {status}, not READY (its upload did not "
                             f"complete); log it again")
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().grounder


def _logged_model_id(client, model_uri: str) -> Optional[str]:
    """The logged model behind a models:/ URI (None for other URIs, which name files directly)."""
    if not model_uri.startswith("models:/"):
        return None
    parts = model_uri[len("models:/"):].strip("/").split("/")
    if len(parts) == 1:
        return parts[0]
    name, version = parts[0], parts[1]
    if version.isdigit():
        return client.get_model_version(name, version).model_id
    return client.get_model_version_by_alias(name, version).model_id
