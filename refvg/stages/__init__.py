"""The pipeline's stages as plain library functions, one module per stage: generate, prepare,
pretrain, detections, teacher, train, evaluate, report.

The CLI, the Prefect flows and the tests all call these; none of them imports MLflow or Prefect.
Each returns what it produced (paths, metrics) so the caller decides what to log. torch and
transformers are imported by the stages that use them: `generate` and `report` start in a fraction
of the time without them. `refvg.stages.<stage>` is the stage's function (generate, prepare,
pretrain, detections, teacher, report share their module's name); its module's other names are
imported from the module, e.g. `from refvg.stages.teacher import _no_teacher`.
"""

from refvg.stages.detections import detections
from refvg.stages.evaluate import EvalReport, eval_splits, evaluate_method
from refvg.stages.generate import generate
from refvg.stages.paths import checkpoint_dir, instances_path, synthetic_dir, teacher_dir
from refvg.stages.prepare import prepare, prepared_manifest
from refvg.stages.pretrain import pretrain
from refvg.stages.report import report
from refvg.stages.splits import open_split
from refvg.stages.teacher import teacher
from refvg.stages.train import train_method, with_teacher_features

__all__ = [
    "EvalReport",
    "checkpoint_dir",
    "detections",
    "eval_splits",
    "evaluate_method",
    "generate",
    "instances_path",
    "open_split",
    "prepare",
    "prepared_manifest",
    "pretrain",
    "report",
    "synthetic_dir",
    "teacher",
    "teacher_dir",
    "train_method",
    "with_teacher_features",
]
