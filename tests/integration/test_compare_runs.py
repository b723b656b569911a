"""benchmarks/compare.py end to end on the tiny set: two seeds of one pair in two worker processes
give pairs.json's records, each run trained with its own seed in its own folder, and a second call
with the same work folder trains nothing."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import ROOT, write_params

spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_compare_trains_each_run_once(in_tiny, tmp_path, monkeypatch, capsys):
    from refvg.engine.checkpoint import load_checkpoint

    params = write_params(in_tiny, train={"epochs": 1, "batch_size": 16, "warmup_steps": 2})
    out, work = tmp_path / "pairs.json", tmp_path / "work"
    pair = [("transvg", "transvg_blind")]
    records = compare.compare(params, pair, [0, 1], work, keep=True, jobs=2)
    compare.write_outputs(records, out)
    assert "4 runs: 0 finished before, 4 to train" in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert [(r["split"], r["metric"]) for r in records] == [
        (s, "acc@0.5") for s in ("val", "testA", "testB")
    ]
    keys = {"pair", "split", "seeds", "a_mean", "b_mean", "mean_diff", "ci_low", "ci_high"}
    for r in records:
        assert keys <= set(r) and r["pair"] == "transvg vs transvg_blind"
        assert r["seeds"] == 2 and len(r["a"]) == len(r["b"]) == 2 and r["epochs"] == 1
        assert r["claim"] == "the model uses the expression"
        assert r["ci_low"] <= r["mean_diff"] <= r["ci_high"]
        assert r["verdict"] in ("reproduced", "reversed", "inconclusive")
    for seed in (0, 1):  # each run trained with its own seed, the rest of params.yaml as it is
        for method in ("transvg", "transvg_blind"):
            run = work / "runs" / f"{method}-seed{seed}"
            saved = load_checkpoint(run / "checkpoints" / method / "best.pt")
            assert saved["config"]["train"]["seed"] == seed
            assert saved["config"]["train"]["epochs"] == 1
    assert out.with_suffix(".md").read_text().startswith("### What reproduces")

    monkeypatch.setattr(compare, "_train_all", lambda *a: pytest.fail("nothing may train"))
    again = compare.compare(params, pair, [0, 1], work, keep=True, jobs=2)
    assert "4 runs: 4 finished before, 0 to train" in capsys.readouterr().out
    assert json.loads(json.dumps(again)) == records
