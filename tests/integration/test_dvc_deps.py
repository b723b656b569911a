"""dvc.yaml's dependencies rerun exactly what changed: in a real git + DVC repository of the project
(the default params.yaml, every method), with a lock recorded as if every stage had run, a family's
knob, a family's model file and a shared module each make stale the train (and evaluate) stages of
the methods that read them, and no other. Nothing trains: only the `resolve` stage runs, and `dvc
status` says what else would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, project_copy

pytestmark = pytest.mark.e2e

# The knob of one family in params.yaml, and the methods that read it (mattnet_erase and the methods
# that share its knobs). Where the knob lives is this one constant.
KNOB = ("methods", "mattnet_erase", "config", "erase", "rate")
KNOB_USERS = {"mattnet_erase", "mattnet_no_erase", "mattnet_erase_det", "mattnet_no_erase_det"}
# A model file and the methods whose training imports it; weak_cam reads CMSA's mask read-out
# (cmsa.peak_component).
MODEL_FILE = "refvg/models/cmsa.py"
MODEL_FILE_USERS = {"cmsa"}  # cmsa_concat too, but it is a control: no DVC stage
SHARED_FILE = "refvg/models/backbones.py"  # every model's backbones


def sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def dvc(args: list[str], repo: Path, env: dict) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], repo, env)


def stale(repo: Path, env: dict) -> set[str]:
    """What `dvc status --json` lists (the same call, in this process: it needs no environment and
    saves a DVC start, a second or more each, seven times)."""
    from contextlib import chdir

    from dvc.repo import Repo

    with chdir(repo), Repo(str(repo)) as dvc_repo:
        return set(dvc_repo.status())


def placeholders_for_every_stage(repo: Path) -> None:
    """Stand-in files for every dependency and output a stage would have made, so `dvc commit` can
    record a lock as if the whole pipeline had run (a file where the path has a suffix, else a
    folder)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        paths = [
            Path(o.fs_path)
            for stage in dvc_repo.index.stages
            for o in [*stage.deps, *stage.outs]
            if not isinstance(o, ParamsDependency)
        ]
    for path in paths:
        if path.exists():
            continue
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"stand-in for {path.name}\n")
        else:
            path.mkdir(parents=True)
            (path / "stand-in").write_text("stand-in\n")


def recorded_repo(tmp_path: Path, prefect_api: str) -> tuple[Path, dict]:
    """The project as a git + DVC repository whose lock records every stage as run and up to
    date. Its stages talk to the session's Prefect test server: a project server of its own would
    boot for ~20 s and outlive the test."""
    repo = project_copy(tmp_path / "repo")
    shutil.copy(
        ROOT / "params.yaml", repo / "params.yaml"
    )  # every method, as the pipeline runs them
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PREFECT_API_URL": prefect_api,
    }
    sh(["git", "init", "-q"], repo, env)
    dvc(["init", "-q"], repo, env)
    dvc(["config", "core.analytics", "false"], repo, env)
    dvc(["repro", "resolve"], repo, env)
    placeholders_for_every_stage(repo)
    dvc(["commit", "-f"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "every stage recorded"], repo, env)
    assert stale(repo, env) == set(), "the recorded lock is not up to date"
    noop = dvc(["repro", "resolve"], repo, env).stdout
    assert "Stage 'resolve' didn't change, skipping" in noop and "Running stage" not in noop
    return repo, env


def runs_of(methods: set[str], params: dict) -> set[str]:
    """The train and evaluate stages of `methods`."""

    def group(m: str, kind: str) -> str:
        return (
            f"{kind}_distill@{m}" if m in (params.get("distill_methods") or {}) else f"{kind}@{m}"
        )

    return {group(m, kind) for m in methods for kind in ("train", "evaluate")}


def stale_runs(repo: Path, env: dict) -> set[str]:
    """The stale train and evaluate stages after `resolve` ran (the cheap stages upstream of them,
    e.g. detections, which reads every method's entry, may rerun: they retrain nothing unless their
    output changes)."""
    dvc(["repro", "resolve"], repo, env)
    return {
        s
        for s in stale(repo, env)
        if s.split("@")[0] in ("train", "evaluate", "train_distill", "evaluate_distill")
    }


def test_a_change_reruns_exactly_the_methods_that_read_it(tmp_path, prefect_api):
    repo, env = recorded_repo(tmp_path, prefect_api)
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    methods = set(params["methods"]) | set(params.get("distill_methods") or {})
    assert KNOB_USERS < methods and MODEL_FILE_USERS < methods

    # Knobs training does not read: an evaluation knob re-evaluates, a storage knob does nothing.
    edited = yaml.safe_load(original)
    edited["eval"]["num_qualitative"] += 1
    edited["storage"]["max_attempts"] += 1
    params_path.write_text(yaml.safe_dump(edited, sort_keys=False))
    assert stale_runs(repo, env) == {
        s for s in runs_of(methods, params) if s.startswith("evaluate")
    }

    # One family's knob: that family's methods.
    edited = yaml.safe_load(original)
    section = edited
    for key in KNOB[:-1]:
        section = section[key]
    section[KNOB[-1]] = section[KNOB[-1]] / 2
    params_path.write_text(yaml.safe_dump(edited, sort_keys=False))
    assert stale_runs(repo, env) == runs_of(KNOB_USERS, params)
    params_path.write_text(original)
    assert stale_runs(repo, env) == set(), "the stamps did not come back byte for byte"

    # A family's model file: the methods whose training imports it; a shared module: every method.
    for relpath, users in ((MODEL_FILE, MODEL_FILE_USERS), (SHARED_FILE, methods)):
        source = repo / relpath
        code = source.read_text()
        source.write_text(code + "# an edit\n")
        assert stale_runs(repo, env) == runs_of(users, params), relpath
        source.write_text(code)  # (a stamp left changed shows in the next assertion)
    assert stale_runs(repo, env) == set()
