"""benchmarks/compare.py: the paired interval is the t-interval of the per-seed differences, a pair
with unequal budgets is refused, and a run on the tiny set gives one record per pair and split."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.helpers import ROOT, write_params

spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_paired_interval_is_the_t_interval_of_the_differences():
    rec = compare.paired_interval([0.5, 0.6, 0.7], [0.4, 0.5, 0.5])  # differences 0.1, 0.1, 0.2
    sd = math.sqrt(((0.1 - 0.4 / 3) ** 2 * 2 + (0.2 - 0.4 / 3) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 df)
    assert rec["mean_diff"] == pytest.approx(0.4 / 3)
    assert (rec["ci_low"], rec["ci_high"]) == pytest.approx((0.4 / 3 - half, 0.4 / 3 + half))
    assert compare.verdict(rec) == "inside noise"  # the interval reaches below 0
    assert (
        compare.verdict(compare.paired_interval([0.9, 0.8, 0.85], [0.1, 0.15, 0.1])) == "a better"
    )
    assert (
        compare.verdict(compare.paired_interval([0.1, 0.15, 0.1], [0.9, 0.8, 0.85])) == "b better"
    )


@pytest.mark.e2e
def test_compare_on_the_tiny_set(in_tiny, tmp_path):
    from refvg.engine.checkpoint import load_checkpoint

    params = write_params(in_tiny, train={"epochs": 1, "batch_size": 16, "warmup_steps": 2})
    records = compare.compare(
        params, [("transvg", "transvg_blind")], [0, 1], tmp_path / "work", keep=True
    )
    assert [r["split"] for r in records] == ["val", "testA", "testB"]
    for r in records:
        assert (
            r["pair"] == "transvg vs transvg_blind"
            and r["seeds"] == 2
            and len(r["a"]) == len(r["b"]) == 2
        )
        assert r["mean_diff"] == pytest.approx(r["a_mean"] - r["b_mean"])
    for seed in (0, 1):  # each run trained with its own seed, the rest of params.yaml as it is
        for method in ("transvg", "transvg_blind"):
            saved = load_checkpoint(
                tmp_path / "work" / f"seed{seed}" / "checkpoints" / method / "best.pt"
            )
            assert (
                saved["config"]["train"]["seed"] == seed and saved["config"]["train"]["epochs"] == 1
            )
    assert "| transvg vs transvg_blind | val | 1 | 2 |" in compare.markdown(records)

    unequal = write_params(
        in_tiny,
        methods={
            "transvg": {"model": "transvg"},
            "transvg_blind": {
                "model": "transvg",
                "language_blind": True,
                "overrides": {"train": {"epochs": 3}},
            },
        },
    )
    with pytest.raises(SystemExit, match="needs equal budgets"):
        compare.compare(
            unequal, [("transvg", "transvg_blind")], [0, 1], tmp_path / "work2", keep=False
        )
