"""EpmVG end to end on the tiny set, through the Prefect flows with a real MLflow sqlite store: the
teacher flow (its own run, retrieval recall per epoch, checkpoint + cached features), then train +
evaluate the distilling student, which reads the cached features and never runs the teacher; the
control without distillation; the report's side-by-side table."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from refvg import stages
from refvg.config import load_config
from refvg.models import clip_teacher
from tests.helpers import write_params
from tests.helpers import SMALL_TEACHER

OFF = {"image_weight": 0.0, "text_weight": 0.0, "similarity_weight": 0.0}
METHODS = {
    "epmvg_no_distill": {"model": "epmvg", "config": OFF, "overrides": {"train": {"epochs": 1}}}
}
DISTILL = {"epmvg": {"model": "epmvg"}}


def test_teacher_then_epmvg_through_the_flows(in_tiny, prefect_api, mlflow_uri, monkeypatch):
    from flows.stages import evaluate_flow, teacher_flow, train_flow

    write_params(
        Path.cwd(), methods=METHODS, distill_methods=DISTILL, teacher={**SMALL_TEACHER, "epochs": 2}
    )
    cfg = load_config("params.yaml")
    taught = teacher_flow(params="params.yaml")
    features = Path(cfg.teacher.out_dir) / "features"
    meta = json.loads((features / "manifest.json").read_text())
    assert (
        meta["dim"] == 16
        and meta["grid"] == 8
        and (Path(cfg.teacher.out_dir) / "model" / "config.json").exists()
    )
    assert set(taught["val"]) == {"recall@1", "recall@5", "image_recall@1"}
    own_task = taught["corpus"]
    assert own_task["images_shared_with_grounding"] == 0 and 0 <= own_task["text_recall@1"] <= 1

    def no_teacher(*args, **kwargs):
        raise AssertionError(
            "the student must read the cached teacher features, not run the teacher"
        )

    monkeypatch.setattr(clip_teacher, "encode_images", no_teacher)
    monkeypatch.setattr(clip_teacher, "encode_texts", no_teacher)
    trained = train_flow(method="epmvg", params="params.yaml")
    evaluated = evaluate_flow(method="epmvg", params="params.yaml")
    assert 0 <= evaluated["metrics"]["val"]["acc@0.5"] <= 1 and trained["best_epoch"] >= 1
    control = stages.train_method(cfg, "epmvg_no_distill")
    stages.evaluate_method(cfg, "epmvg_no_distill")
    assert "train/distill_image" not in control.history[0] and "train/giou" in control.history[0]

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("refvg").experiment_id
    teacher_run = client.search_runs([exp], filter_string="tags.`refvg.stage` = 'teacher'")[0]
    recall = client.get_metric_history(teacher_run.info.run_id, "val/recall_at_1")
    assert [m.step for m in recall] == [1, 2] and all(0 <= m.value <= 1 for m in recall)
    assert (
        teacher_run.data.metrics["final_val/recall_at_5"]
        >= teacher_run.data.metrics["final_val/recall_at_1"]
        == recall[-1].value
    )
    assert teacher_run.data.params["teacher.projection_dim"] == "16"
    # Its own task, per epoch and final: retrieval on the caption corpus's held-out images, with
    # chance.
    own = client.get_metric_history(teacher_run.info.run_id, "corpus/image_recall_at_1")
    final = teacher_run.data.metrics
    assert [m.step for m in own] == [1, 2]
    # the teacher kept is its best epoch by held-out caption->image recall (ties: the first)
    chosen = client.get_metric_history(teacher_run.info.run_id, "corpus/text_recall_at_1")
    best = max(range(len(chosen)), key=lambda i: (chosen[i].value, -i))
    assert final["final_corpus/image_recall_at_1"] == own[best].value
    assert final["final_corpus/chance_at_1"] == own_task["chance@1"]
    artifacts = {a.path for a in client.list_artifacts(teacher_run.info.run_id)}
    assert {"manifest.json", "teacher"} <= artifacts
    assert "teacher/config.json" in {
        a.path for a in client.list_artifacts(teacher_run.info.run_id, "teacher")
    }
    train_run = client.search_runs([exp], filter_string="tags.`refvg.stage` = 'train@epmvg'")[0]
    losses = client.get_metric_history(train_run.info.run_id, "train/distill_similarity")
    assert len(losses) == cfg.train.epochs and all(m.value >= 0 for m in losses)
    image = client.get_metric_history(train_run.info.run_id, "train/distill_image")
    assert (
        image[-1].value < image[0].value
    )  # the student's visual tokens move towards the teacher's

    summary = stages.report(cfg).read_text()
    with_, without = (
        json.loads((Path(cfg.eval.metrics_dir) / f"{m}.json").read_text())["splits"]["val"][
            "acc@0.5"
        ]
        for m in ("epmvg", "epmvg_no_distill")
    )
    assert (
        f"| epmvg vs epmvg_no_distill | {with_:.3f} vs {without:.3f} ({with_ - without:+.3f})"
        in summary
    )
