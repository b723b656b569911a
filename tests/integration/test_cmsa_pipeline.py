"""CMSA end to end on the tiny set: train_method -> the evaluate flow (Prefect test harness, real
MLflow sqlite store) -> metrics JSON with mask metrics per split, overlays, the report's mask
table."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from refvg import stages
from refvg.config import load_config
from refvg.data.dataset import read_manifest
from refvg.data.prepare import prepared_path
from tests.helpers import write_params

SMALL = {
    "visual_dim": 16,
    "word_dim": 16,
    "d_model": 32,
    "ffn_dim": 32,
    "decoder_channels": [16, 8],
}
CMSA = {
    "cmsa": {
        "model": "cmsa",
        "config": SMALL,
        "overrides": {"model": {"visual": {"out_stages": [1, 2]}}},
    }
}


def test_cmsa_train_evaluate_report(in_tiny, prefect_api, mlflow_uri):
    from flows.stages import evaluate_flow

    write_params(Path.cwd(), methods=CMSA)
    cfg = load_config("params.yaml")
    epochs = []
    result = stages.train_method(cfg, "cmsa", on_epoch_end=lambda m, e: epochs.append(m))
    assert result.best_checkpoint.exists() and len(epochs) == cfg.train.epochs
    assert {
        "train/loss",
        "train/bce",
        "train/dice",
        "val/acc@0.5",
        "val/mask/oIoU",
        "val/mask/mIoU",
    } <= set(epochs[0])
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]

    out = evaluate_flow(method="cmsa", params="params.yaml")
    payload = json.loads((Path(cfg.eval.metrics_dir) / "cmsa.json").read_text())
    counts = read_manifest(prepared_path(cfg))["splits"]
    assert set(payload["splits"]) == {"val", "testA", "testB"}  # every prepared split but train
    for split in payload["splits"]:
        m = payload["splits"][split]
        assert 0 <= m["acc@0.5"] <= 1  # the box from the mask, in the box table like any method
        mask = m["mask"]
        assert set(mask) == {
            "oIoU",
            "mIoU",
            "prec@0.5",
            "prec@0.6",
            "prec@0.7",
            "prec@0.8",
            "prec@0.9",
            "n",
        }
        assert (
            mask["n"] == counts[split]["samples"]
            and 0 <= mask["mIoU"] <= 1
            and 0 <= mask["oIoU"] <= 1
        )
        precs = [mask[f"prec@{t}"] for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
        assert precs == sorted(precs, reverse=True)
    assert out["metrics"]["val"]["mask"] == payload["splits"]["val"]["mask"]
    assert (Path(cfg.eval.plots_dir) / "cmsa" / "qualitative.png").stat().st_size > 0

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("refvg").experiment_id],
        filter_string="tags.`refvg.stage` = 'evaluate@cmsa'",
    )
    logged = runs[0].data.metrics
    assert logged["val.mask.oIoU"] == payload["splits"]["val"]["mask"]["oIoU"]
    assert "testB.mask.prec_at_0.9" in logged and "val.acc_at_0.5" in logged

    summary = stages.report(cfg).read_text()
    assert "| cmsa | cmsa | yes |" in summary  # the box table lists it
    v = payload["splits"]["val"]["mask"]
    assert (
        f"{v['oIoU']:.3f} / {v['mIoU']:.3f} / {v['prec@0.5']:.3f}" in summary
    )  # and the mask table
