"""Scheduled deployments: prefect.yaml served by flows/serve.py against a real Prefect server on
loopback; the deployments are registered with their cron schedules, and a triggered run
completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from refvg import stages
from refvg.config import load_config
from tests.helpers import ROOT, write_params

pytestmark = pytest.mark.e2e


def test_prefect_yaml_entrypoints_and_schedules_are_valid():
    from prefect.client.schemas.schedules import CronSchedule

    from flows.serve import declared, load_flow

    specs = declared()
    assert {d["name"] for d in specs} == {"refvg-pipeline", "refvg-evaluate"}
    for d in specs:
        flow = load_flow(d["entrypoint"])
        unknown = set(d["parameters"]) - set(flow.parameters.properties)
        assert not unknown, (
            f"{d['name']}: parameters {unknown} are not parameters of {d['entrypoint']}"
        )
        for s in d["schedules"]:
            CronSchedule(cron=s["cron"], timezone=s["timezone"])  # raises on a malformed cron


def test_served_deployment_runs_when_triggered(in_tiny, prefect_api, mlflow_uri):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    cfg = load_config(
        write_params(
            in_tiny,
            train={"epochs": 1, "batch_size": 16, "warmup_steps": 2},
            methods={"transvg": {"model": "transvg"}},
        )
    )
    stages.train_method(cfg, "transvg")  # what the evaluate deployment evaluates

    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": str(ROOT),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--only", "refvg-evaluate"],
        cwd=in_tiny,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        with get_client(sync_client=True) as client:
            # Until `serve` registers it (or dies); any other error is the test's failure, at once.
            # The ceiling only bounds a hang: a busy machine takes what it takes.
            deadline = time.monotonic() + 600
            while True:
                try:
                    deployment = client.read_deployment_by_name("evaluate/refvg-evaluate")
                    break
                except ObjectNotFound:
                    assert serve.poll() is None, serve.stdout.read()[-4000:]
                    assert time.monotonic() < deadline, "the deployment was never registered"
                    time.sleep(0.5)
            declared = next(
                d
                for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                if d["name"] == "refvg-evaluate"
            )
            assert [s.schedule.cron for s in deployment.schedules] == [
                declared["schedules"][0]["cron"]
            ]
            assert deployment.parameters == declared["parameters"]

            run = run_deployment("evaluate/refvg-evaluate", timeout=0)
            deadline = time.monotonic() + 600  # a ceiling, as above
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert serve.poll() is None, serve.stdout.read()[-4000:]
                assert time.monotonic() < deadline, f"flow run still {state.type} after 600 s"
                time.sleep(1)
        assert state.is_completed(), state.message
        assert (in_tiny / "metrics" / "transvg.json").exists()  # the run worked where it was served
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except (
            subprocess.TimeoutExpired
        ):  # ended either way: SIGKILL to it and the flow runs it started
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
