"""The one module that talks to MLflow.

- Store: `MLFLOW_TRACKING_URI` when set, else `tracking.tracking_uri` of params.yaml (sqlite in the
repo).
  Relative paths (the sqlite file, `artifact_root`, `unlogged_dir`) start at the DVC project's root
  (`DVC_ROOT`, which DVC sets to the repository itself even for `--temp` and queued experiments),
  else at the working directory: every workspace of one repository logs to one store, and nothing
  is left in a temporary workspace DVC deletes.
- Grouping: every stage of one pipeline run is a child of one parent run, found by a key made of the
git
  commit, the params and the DVC experiment's name; so `dvc repro` (one process per stage) and
  `flows/pipeline.py` (one process) group the same way, and each `dvc exp run` gets a parent of its
  own, named and tagged after the experiment. Each stage reopens the parent and, when it ends,
  closes it with its own outcome (FINISHED, or FAILED): after the last stage the parent is closed,
  with its duration.
- The experiment is marked as a model-training one (`mlflow.experimentKind`), so MLflow 3's UI opens
  it on its runs rather than on the GenAI overview.
- Cost: metrics go in one `log_batch` per epoch, never one call per value.
- Faults: a tracking failure is reported and counted, never raised into training (losing a metric is
better
  than losing a run), and the refused call is kept: it goes out with the next one once the store
  answers again, or is saved to `tracking.unlogged_dir` at the end of the stage for `python -m
  refvg.tracking replay`. MLflow's HTTP retries are bounded (`tracking.http_retries`,
  `tracking.http_timeout_s`) so a dead server costs seconds per epoch, not minutes. Several
  pipelines can share one sqlite store: what they cannot do at once (schema creation, find-or-create
  of the experiment and parent run) runs under a file lock.
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
# How MLflow 3 marks an experiment's type (its UI reads it; "genai_development" is the other kind).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# What DVC exports to a stage of an experiment (dvc/env.py; DVC_ROOT in every stage).
DVC_ROOT, DVC_EXP_NAME, DVC_EXP_BASELINE_REV = "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"
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
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
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


def project_root() -> Path:
    """Where relative store paths start: the DVC project (`DVC_ROOT`; for a `--temp` or queued
    experiment DVC points it at the repository, not at the temporary copy it runs in), else the
    working directory."""
    root = os.environ.get(DVC_ROOT)
    return Path(root).resolve() if root and Path(root).is_dir() else Path.cwd()


def from_root(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def dvc_experiment() -> dict[str, str]:
    """The DVC experiment this process runs in ({} outside one): its name and baseline commit."""
    found = {"name": os.environ.get(DVC_EXP_NAME), "baseline": os.environ.get(DVC_EXP_BASELINE_REV)}
    return {k: v for k, v in found.items() if v}


def pipeline_key(cfg: Config, commit: str, experiment: Optional[str] = None) -> str:
    blob = {"commit": commit, "cfg": cfg.model_dump(mode="json")}
    if experiment:  # two experiments never share a parent, even with the same params
        blob["dvc_exp"] = experiment
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


class Tracker:
    """A stage's MLflow run. All calls go through the client with an explicit run id, so Prefect's
    task threads never depend on MLflow's thread-local "active run".

    Every metrics/params/tags/end call is queued and the queue is sent in order; a call the store
    refuses stays queued and goes out with the next one, so logging resumes by itself when the store
    is back (a run the store could not create at the start is created then). What is still queued
    when the stage ends is written to `tracking.unlogged_dir` and reported; `python -m
    refvg.tracking replay FILE` sends it later."""

    def __init__(
        self, client, run_id: Optional[str], failures: int = 0, spec: Optional[dict] = None, s3=None
    ):
        self.client, self.run_id, self.failures, self.spec = client, run_id, failures, spec
        self.parent_id: Optional[str] = None  # the pipeline's parent run, known once the run exists
        self.s3 = s3  # refvg.storage.S3Location when artifacts may live in S3
        self.pending: list[dict] = []  # JSON-able calls not yet accepted by the store, oldest first
        self.not_uploaded: list[str] = []  # files that never reached the store (they stay on disk)

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _connect(self) -> bool:
        if self.client is not None and self.run_id is not None:
            return True
        if self.spec is None:
            return False
        try:
            with _store_lock(
                self.spec["uri"]
            ):  # opening an sqlite store may create or migrate its schema
                if self.client is None:
                    self.client = _client(self.spec)
                if self.run_id is None:
                    self.run_id, self.parent_id = _open_run(self.client, self.spec)
                    log.info(
                        "MLflow run %s (stage %s) in %s",
                        self.run_id,
                        self.spec["stage"],
                        display_uri(self.spec["uri"]),
                    )
            return True
        except Exception as err:  # noqa: BLE001 - an unreachable store must not stop the stage
            self.failures += 1
            log.warning(
                "MLflow store %s unreachable (%s: %s); stage %s runs "
                "untracked until it answers (its "
                "tracking calls are kept)",
                display_uri(self.spec["uri"]),
                type(err).__name__,
                _short(err),
                self.spec["stage"],
            )
            return False

    def _safe(self, what: str, fn, *args, **kwargs):
        """A call that is not queued (it only makes sense now): a failure is counted and reported,
        never raised."""
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never kill a training run
            self.failures += 1
            log.warning(
                "MLflow: could not %s (%s: %s); the run goes on",
                what,
                type(err).__name__,
                _short(err),
            )
            return None

    def _queue(self, call: dict) -> None:
        if self.active or self.spec is not None:
            self.pending.append(call)
            self.flush()

    def flush(self) -> bool:
        """Send the queued calls in order; True when none is left."""
        if self.pending and self._connect():
            while self.pending:
                try:
                    target = self._target(self.pending[0])
                    if target is not None:  # (None: a run outside any pipeline has no parent)
                        _send(self.client, target, self.pending[0])
                except Exception as err:  # noqa: BLE001 - tracking must never kill a training run
                    self.failures += 1
                    log.warning(
                        "MLflow: could not %s (%s: %s); %d call(s) kept to send with "
                        "the next one, the run "
                        "goes on",
                        _WHAT[self.pending[0]["kind"]],
                        type(err).__name__,
                        _short(err),
                        len(self.pending),
                    )
                    return False
                self.pending.pop(0)
        return not self.pending

    def _target(self, call: dict) -> Optional[str]:
        if call.get("target") != "parent":
            return self.run_id
        if self.parent_id is None:  # a run created before this was recorded (a replayed file)
            self.parent_id = self.client.get_run(self.run_id).data.tags.get("mlflow.parentRunId")
        return self.parent_id

    def end(self, status: str) -> None:
        now = _now_ms()
        self._queue({"kind": "end", "status": status, "end_time": now})
        # The parent takes the outcome of its latest stage: FINISHED after the pipeline's last
        # stage, or FAILED where a stage failed (DVC stops there); the next stage reopens it.
        self._queue({"kind": "end", "status": status, "end_time": now, "target": "parent"})

    def log_params(self, params: dict) -> None:
        items = [[k, str(v)[:6000]] for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # the store's batch limit
            self._queue({"kind": "params", "params": items[i : i + 100]})

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        now = _now_ms()
        items = [
            [k.replace("@", "_at_"), float(v), now, step or 0]
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float))
        ]
        self._queue({"kind": "metrics", "metrics": items})

    def set_tags(self, tags: dict, parent: bool = False) -> None:
        call = {"kind": "tags", "tags": [[k, str(v)] for k, v in tags.items()]}
        self._queue({**call, "target": "parent"} if parent else call)

    def log_parent_metrics(self, metrics: dict) -> None:
        """Metrics on the pipeline's parent run (the report's figures, for comparing pipelines)."""
        now = _now_ms()
        items = [
            [k.replace("@", "_at_"), float(v), now, 0]
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        self._queue({"kind": "metrics", "metrics": items, "target": "parent"})

    # File transfers raise, unlike the calls above: the caller retries them and reports the final
    # failure.
    def log_artifact(
        self, path: Path, artifact_path: Optional[str] = None, parent: bool = False
    ) -> None:
        path = Path(path)
        if not self.active:
            self.not_uploaded.append(str(path))
            return
        run_id = self._target({"target": "parent"}) if parent else self.run_id
        if run_id is None:
            self.not_uploaded.append(f"{path} (no pipeline run to attach it to)")
            return
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def register_model(self, model_uri: Optional[str], name: str, tags: dict) -> Optional[int]:
        """A new version of registered model `name` (created if new) for a logged model; returns the
        version. Raises on failure, like the other transfers."""
        if model_uri is None or not self.active:
            return None
        import mlflow

        with _store_lock(self.spec["uri"]):  # two pipelines registering at once on one sqlite file
            version = mlflow.register_model(
                model_uri, name, tags={k: str(v) for k, v in tags.items()}
            )
        log.info("registered %s as models:/%s/%s", model_uri, name, version.version)
        return int(version.version)

    def log_model(
        self, checkpoint: Path, tokenizer_dir: Path, name: str = "model"
    ) -> Optional[str]:
        """Log a pyfunc model (image + expression -> box) built from our checkpoint; returns its
        URI.

        The logged model is finalised READY only once every file is in the artifact store. An upload
        that fails (after the S3 client's retries) leaves it FAILED, with what it had uploaded
        deleted where the store still answers, and raises StorageError naming the destination: never
        a half-uploaded model that looks complete."""
        if not self.active:
            self.not_uploaded.append(f"{checkpoint} (as MLflow model {name!r})")
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
                self._safe(
                    "mark a failed model upload",
                    self.client.finalize_logged_model,
                    m.model_id,
                    LoggedModelStatus.FAILED,
                )
                self._discard(m.artifact_location)
            where = partial[0].artifact_location if partial else "the artifact store"
            raise StorageError(
                f"uploading model {name!r} of run {self.run_id} to {display_uri(where)} failed: "
                f"{describe(err)}"
            ) from err
        self.client.finalize_logged_model(info.model_id, LoggedModelStatus.READY)
        return info.model_uri

    def _run_models(self) -> list:
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        found = self.client.search_logged_models(
            experiment_ids=[exp_id], filter_string=f"source_run_id = '{self.run_id}'"
        )
        return list(found)

    def _discard(self, artifact_location: str) -> None:
        """Best effort: the store may be the thing that is down; the FAILED status is what readers
        check."""
        from refvg import storage

        if not artifact_location.startswith("s3://"):
            return
        try:
            if self.s3 is not None:
                n = storage.delete_prefix(self.s3, artifact_location)
                log.warning("deleted %d object(s) of the failed upload at %s", n, artifact_location)
        except Exception as err:  # noqa: BLE001 - cleanup of a failure must not mask it
            log.warning(
                "could not delete the partial upload at %s (%s); it is marked FAILED",
                artifact_location,
                storage.describe(err),
            )

    def close(self, status: str) -> Optional[Path]:
        """End the run; whatever the store still refuses is saved to a file (returned) and
        reported."""
        self.end(status)
        stage = self.spec["stage"] if self.spec else "?"
        if self.failures:
            log.warning("MLflow: %d tracking call(s) failed during stage %s", self.failures, stage)
        if self.not_uploaded:
            log.warning("MLflow: not uploaded (still on disk): %s", ", ".join(self.not_uploaded))
        if not self.pending or self.spec is None:
            return None
        path = (
            Path(self.spec["unlogged_dir"])
            / f"{_slug(stage)}-{self.run_id or 'no-run'}-{_now_ms()}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "spec": self.spec,
                    "run_id": self.run_id,
                    "parent_id": self.parent_id,
                    "pending": self.pending,
                }
            )
        )
        log.warning(
            "MLflow: not logged for stage %s (run %s): %s. Saved to %s; "
            "send it once the store is back: "
            "python -m refvg.tracking replay %s",
            stage,
            self.run_id or "not created",
            _describe(self.pending),
            path,
            path,
        )
        return path


def display_uri(uri: str) -> str:
    """A store URI for logs and messages: any user:password@ part is masked."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=f"***@{host}"))
    return uri


_WHAT = {"metrics": "log metrics", "params": "log params", "tags": "set tags", "end": "end the run"}


def _send(client, run_id: str, call: dict) -> None:
    from mlflow.entities import Metric, Param, RunTag

    kind = call["kind"]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(*m) for m in call["metrics"]])
    elif kind == "params":
        client.log_batch(run_id, params=[Param(*p) for p in call["params"]])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(*t) for t in call["tags"]])
    elif kind == "end":
        client.set_terminated(run_id, call["status"], end_time=call["end_time"])
    else:
        raise ValueError(f"unknown tracking call {kind!r}")


def _describe(pending: list[dict]) -> str:
    parts = []
    metrics = [m for c in pending if c["kind"] == "metrics" for m in c["metrics"]]
    if metrics:
        steps = sorted({m[3] for m in metrics})
        parts.append(f"{len(metrics)} metric values (steps {', '.join(map(str, steps))})")
    params = sum(len(c["params"]) for c in pending if c["kind"] == "params")
    if params:
        parts.append(f"{params} params")
    tags = sum(len(c["tags"]) for c in pending if c["kind"] == "tags")
    if tags:
        parts.append(f"{tags} tags")
    parts += [
        f"the {'pipeline' if c.get('target') == 'parent' else 'run'}'s end ({c['status']})"
        for c in pending
        if c["kind"] == "end"
    ]
    return ", ".join(parts)


def replay(path: Path) -> bool:
    """Send a file of calls a stage could not log (see Tracker.close) to its run, creating the run
    if the store was down from the start. True, and the file removed, when everything went through;
    otherwise the file keeps what is left."""
    path = Path(path)
    saved = json.loads(path.read_text())
    tracker = Tracker(None, saved["run_id"], spec=saved["spec"])
    tracker.parent_id = saved.get("parent_id")
    tracker.pending = saved["pending"]
    if tracker.flush():
        path.unlink()
        return True
    path.write_text(json.dumps({**saved, "run_id": tracker.run_id, "pending": tracker.pending}))
    return False


def _now_ms() -> int:
    return int(time.time() * 1000)


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def _slug(stage: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stage)


def _store_uri(cfg: Config) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    path = _sqlite_path(uri)
    # Absolute, so a replay from another folder (or a stage that changed directory) reaches the same
    # file, and from the project's root, so every workspace of a repository (DVC's temporary ones
    # too) shares it.
    if path is None or path.is_absolute():
        return uri
    return f"sqlite:///{from_root(str(path)).resolve()}"


def _sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialises, across processes, what two pipelines cannot do at once on one sqlite store:
    create its schema (both run the migrations and one fails: 'table alembic_version already
    exists', 'duplicate column name') and find-or-create the experiment and the pipeline's parent
    run. A server store does this itself."""
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=STORE_LOCK_TIMEOUT_S):
        yield


STORE_LOCK_TIMEOUT_S = (
    600  # a cold store's migrations take ~10 s; minutes only on a machine that is thrashing
)


def _client(spec: dict):
    """A client of the spec's store; creating it opens the store (and for sqlite creates or migrates
    the schema), so callers hold `_store_lock`."""
    disable_telemetry()
    # MLflow's own HTTP retries default to minutes per call (7 with exponential backoff, 120 s
    # timeout): a dead server would stall training at every epoch. Bounded here (MLflow reads them
    # from the environment; a value the user exported wins); a refused call is retried with the next
    # one anyway.
    for var, knob in _HTTP_ENV.items():
        if os.environ.get(var) in (None, _HTTP_ENV_SET.get(var)):
            os.environ[var] = _HTTP_ENV_SET[var] = str(spec[knob])
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(spec["uri"])
    return MlflowClient(tracking_uri=spec["uri"])


_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "http_retries",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "http_timeout_s",
}
_HTTP_ENV_SET: dict[str, str] = {}  # what this module put there, as opposed to the user


def _run_spec(cfg: Config, stage: str, run_name: Optional[str]) -> dict:
    """Everything that creates a stage's run, as JSON: enough to create it later, in another
    process."""
    from refvg import storage

    commit, dirty = git_commit()
    t = cfg.tracking
    loc = storage.location(cfg)
    local = from_root(t.artifact_root).resolve().as_uri()
    artifacts = loc.mlflow_url if loc is not None and loc.mlflow_artifacts else local
    exp = dvc_experiment()
    return {
        "uri": _store_uri(cfg),
        "experiment": t.experiment,
        "artifact_location": artifacts,
        "stage": stage,
        "run_name": run_name or stage,
        "commit": commit,
        "dirty": dirty,
        "pipeline_key": pipeline_key(cfg, commit, exp.get("name")),
        "config": cfg.model_dump(mode="json"),
        "dvc_exp": exp,
        "unlogged_dir": str(from_root(t.unlogged_dir).resolve()),
        "http_retries": t.http_retries,
        "http_timeout_s": t.http_timeout_s,
    }


def _exp_tags(spec: dict) -> dict[str, str]:
    exp = spec.get("dvc_exp") or {}
    tags = {"dvc.exp_name": exp.get("name"), "dvc.exp_baseline": exp.get("baseline")}
    return {k: v for k, v in tags.items() if v}


def _open_run(client, spec: dict) -> tuple[str, str]:
    """(the stage's new run, the pipeline's parent run, reopened)."""
    exp_id = _experiment_id(client, spec)
    parent = _parent_run(client, exp_id, spec)
    run = client.create_run(
        exp_id,
        run_name=spec["run_name"],
        tags={
            "mlflow.parentRunId": parent,
            "refvg.stage": spec["stage"],
            "dvc.stage": spec["stage"],
            "git.commit": spec["commit"],
            "git.dirty": str(spec["dirty"]),
            "refvg.kind": "stage",
            **_exp_tags(spec),
        },
    )
    return run.info.run_id, parent


def _experiment_id(client, spec: dict) -> str:
    exp = client.get_experiment_by_name(spec["experiment"])
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag existed; a user's kind stays
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(
            spec["experiment"],
            artifact_location=spec["artifact_location"],
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except Exception:  # noqa: BLE001 - another stage created it between our two calls (a server store)
        return client.get_experiment_by_name(spec["experiment"]).experiment_id


def _parent_run(client, exp_id: str, spec: dict) -> str:
    from mlflow.entities import Param

    key, commit, dirty = spec["pipeline_key"], spec["commit"], spec["dirty"]
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    if found:
        if found[0].info.status != "RUNNING":  # closed by the previous stage: this one reopens it
            client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    name = f"pipeline {commit[:8]}{'+dirty' if dirty else ''}"
    exp_name = (spec.get("dvc_exp") or {}).get("name")
    run = client.create_run(
        exp_id,
        run_name=f"{exp_name} ({name})" if exp_name else name,
        tags={
            PIPELINE_TAG: key,
            "git.commit": commit,
            "git.dirty": str(dirty),
            "refvg.kind": "pipeline",
            **_exp_tags(spec),
        },
    )
    params = [Param(k, str(v)[:6000]) for k, v in flatten(spec["config"]).items()]
    for i in range(0, len(params), 100):  # the store's batch limit
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


@contextmanager
def stage_run(
    cfg: Config, stage: str, run_name: Optional[str] = None, params: Optional[dict] = None
) -> Iterator[Tracker]:
    """A child run for one DVC/Prefect stage under the pipeline's parent run. Ends FINISHED, or
    FAILED with the exception re-raised. The store being down (at the start or later) never stops
    the stage."""
    from refvg import storage

    s3 = storage.apply_client_env(
        cfg
    )  # MLflow's own boto3 client: our endpoint, region and retry policy
    tracker = Tracker(None, None, spec=_run_spec(cfg, stage, run_name), s3=s3)
    tracker._connect()
    if params:
        tracker.log_params(params)
    try:
        yield tracker
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")


def load_grounder(model_uri: str, cfg: Config):
    """A `Grounder` from an MLflow model: "models:/<name>/<version>", "models:/<model id>",
    "runs:/<run>/model", an s3:// or local MLflow model folder. Loaded through the pyfunc flavour
    (our weights-only checkpoint, nothing unpickled). A model whose upload did not complete is
    refused, with its status named."""
    from refvg import storage

    storage.apply_client_env(cfg)
    t = cfg.tracking
    client = _client(
        {"uri": _store_uri(cfg), "http_retries": t.http_retries, "http_timeout_s": t.http_timeout_s}
    )
    import mlflow

    model_id = _logged_model_id(client, model_uri)
    if model_id is not None:
        status = str(client.get_logged_model(model_id).status)
        if status != "READY":
            raise ValueError(
                f"{model_uri}: logged model {model_id} is {status}, not READY (its upload did not "
                f"complete); log it again"
            )
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().grounder


def _logged_model_id(client, model_uri: str) -> Optional[str]:
    """The logged model behind a models:/ URI (None for other URIs, which name files directly)."""
    if not model_uri.startswith("models:/"):
        return None
    parts = model_uri[len("models:/") :].strip("/").split("/")
    if len(parts) == 1:
        return parts[0]
    name, version = parts[0], parts[1]
    if version.isdigit():
        return client.get_model_version(name, version).model_id
    return client.get_model_version_by_alias(name, version).model_id


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        description="Send tracking calls a stage could not log (files in "
        "tracking.unlogged_dir) to the MLflow store."
    )
    parser.add_argument("action", choices=["replay"])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    left = [f for f in args.files if not replay(f)]
    print(
        f"replayed {len(args.files) - len(left)} of {len(args.files)} file(s)"
        + (f"; still pending: {left}" if left else "")
    )
    sys.exit(1 if left else 0)
