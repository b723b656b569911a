"""Shared fixtures: a tiny configuration, and a tiny generated + prepared dataset built once per
session."""

from __future__ import annotations

import os
from pathlib import Path

# One compute thread per process, set before anything imports torch (subprocesses inherit it): the
# tests' models are tiny, and several tests run two processes at once (torchrun ranks, a server
# beside training), where two threads each oversubscribe the 2 cores CI has and run many times
# slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

from refvg.tracking import disable_telemetry  # noqa: E402
from tests.helpers import S3_CREDENTIALS, write_params  # noqa: E402

disable_telemetry()
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")

# The suite runs on pytest-xdist workers (pyproject's addopts: `-n auto`): one per core this process
# may use, at most 2. Each worker computes on one thread (above), so 2 workers fill CI's 2 cores.
# More are untested: many tests run 2 processes at once themselves.
MAX_WORKERS = 2


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int | None:
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook honours it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_WORKERS))


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A folder with params.yaml and the generated + prepared tiny dataset. Read-only for tests:
    copy it (or use its paths) rather than writing into it."""
    from refvg import stages
    from refvg.config import load_config

    work = tmp_path_factory.mktemp("tiny")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cfg = load_config(write_params(work))
        stages.generate(cfg)
        stages.prepare(cfg)
    finally:
        os.chdir(cwd)
    return work


@pytest.fixture
def in_tiny(tiny_workdir, tmp_path, monkeypatch) -> Path:
    """cwd = a fresh folder whose data/ links to the session's tiny dataset, with its own
    params.yaml."""
    (tmp_path / "data").symlink_to(tiny_workdir / "data")
    (tmp_path / "params.yaml").write_text((tiny_workdir / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's own test harness (a real, temporary API server) for the whole session; its URL is
    also what subprocesses (DVC stages) are pointed at, so every test shares one server start."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(
        server_startup_timeout=600
    ):  # a ceiling: it waits for the server to answer
        yield PREFECT_API_URL.value()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session", autouse=True)
def stage_worker_dir():
    """Stage processes the tests start (DVC stages, probes) share stage workers (flows/launcher.py)
    kept in a folder of this session, stopped at its end. Short path: it holds unix sockets."""
    import shutil
    import tempfile

    from flows.launcher import DIR_ENV, stop_workers

    folder = Path(tempfile.mkdtemp(prefix="refvg-w-"))
    patch = pytest.MonkeyPatch()
    patch.setenv(DIR_ENV, str(folder))
    try:
        yield folder
    finally:
        stop_workers(folder)
        patch.undo()
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> str:
    """moto's standalone S3-compatible server on a free loopback port, shared by the whole
    session."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 600  # a ceiling for a hang; the wait is on the server answering
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start; see {log.name}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture
def s3_bucket(s3_server, tmp_path, monkeypatch, request) -> dict:
    """A fresh bucket on the session's S3 server, and credentials only in the environment (never a
    real profile of the machine: the AWS config files point at nothing)."""
    import re

    from refvg import storage
    from refvg.config import Config

    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    # Unset for the test, and unset again after it: storage.apply_client_env exports some of them.
    for var in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_MAX_ATTEMPTS",
        "AWS_RETRY_MODE",
        *storage.ENV_OVERRIDES.values(),
    ):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    bucket = (
        re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{_free_port()}"
    )
    settings = {"bucket": bucket, "endpoint_url": s3_server, "max_attempts": 3}
    loc = storage.location(Config.model_validate({"storage": settings}))
    storage.ensure_bucket(loc)
    return {"settings": settings, "location": loc}
