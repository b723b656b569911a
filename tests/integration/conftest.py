"""Integration tests run the real pipeline pieces (DVC, Prefect, MLflow, S3, subprocesses) on the
tiny
dataset: all of them are `e2e` (`pytest -m "not e2e"` runs the fast unit and model tests alone)."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
