"""What a method's training depends on, as data: the knobs its training reads and the refvg source
files its training runs. The `resolve` stage writes one stamp per method (`write_stamps`), and each
train stage of dvc.yaml depends on its own stamp, so DVC reruns exactly the methods whose inputs
changed: a family's knob or model file retrains that family (and the methods built on it), a shared
module every method importing it. The same code digest keys resume (refvg.engine.trainer.run_key).

No torch here: the sources are read with `ast`, never imported, so the stage takes a fraction of a
second.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from refvg.config import Config, ConfigError

PACKAGE = "refvg"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SOURCE_ROOT = PACKAGE_DIR.parent  # stamps name files as refvg/..., relative to this
MODELS_PACKAGE = "refvg.models"  # where register_model("<name>") decorates each model's class
# Where every method's training starts, besides its model's module: the driver's training functions
# (a "module:function" follows only that function's imports, so the driver's other stages, which
# import other families, stay out) and the training loop.
TRAINING_ENTRY_POINTS = (
    "refvg.stages.train:train_method",
    "refvg.stages.train:with_teacher_features",
    "refvg.stages.splits:open_split",
    "refvg.engine.trainer",
)
# Knobs that decide how a run is checkpointed, guarded or reported, not what it computes (section ->
# keys, None: the whole section): they neither retrain a method nor throw a run's progress away.
RESUME_NEUTRAL = {"train": ("checkpoint_every_steps", "max_bad_steps"), "tracking": None}
# Sections of a run config that training does not read: generating, evaluating, storing and sharding
# the data, the stand-in detector (its output is the train stage's detections stamp), the teacher's
# own training (its outputs are a dependency of the distilling methods), and the method tables (the
# run config carries the method's own entry, its bases already merged in). The per-epoch validation
# reads eval.batch_size and eval.iou_thresholds, but they decide neither the weights nor the best
# epoch (Acc@0.5), so a new evaluation setting re-scores without retraining.
NOT_READ_BY_TRAINING = (
    "synthetic",
    "eval",
    "storage",
    "parallel",
    "detections",
    "teacher",
    "methods",
    "distill_methods",
    "controls",
)
DIGEST_CHARS = 16


def method_stamp(cfg: Config, method: str) -> dict:
    """What `method`'s training reads: its effective configuration (`Config.for_method`, whose
    `method` entry has its bases merged in) without what training does not read, and the digest of
    every source file it runs."""
    config = training_config(cfg, method)  # raises for a method params.yaml does not declare
    model = config["method"]["model"]
    return {
        "method": method,
        "model": model,
        "config": config,
        "code": training_sources(model),
    }


def training_config(cfg: Config, method: str) -> dict:
    """`cfg.for_method(method)` as JSON, restricted to what training reads (the shared model
    sections and the method's resolved entry, its family's knobs included)."""
    run = cfg.for_method(method).model_dump(mode="json")
    out = {k: v for k, v in run.items() if k not in NOT_READ_BY_TRAINING}
    for section, keys in RESUME_NEUTRAL.items():
        if keys is None:
            out.pop(section, None)
        elif section in out:
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    if method in cfg.distill_methods:  # the student projects into the teacher's embedding space
        out["teacher"] = {"projection_dim": run["teacher"]["projection_dim"]}
    return out


def training_sources(model: str) -> dict[str, str]:
    """Digest of every refvg source file a training of `model` runs: the model's module, the
    training entry points and, transitively, every refvg module they import (path -> sha256
    prefix)."""
    models = registered_models()
    if model not in models:
        raise ConfigError(
            f"unknown model {model!r}; registered models: {', '.join(sorted(models))}"
        )
    return sources_of(models[model], *TRAINING_ENTRY_POINTS)


def sources_of(*entry_points: str) -> dict[str, str]:
    """Digest of every refvg source file the entry points ("module" or "module:function") run,
    following their refvg imports transitively (path -> sha256 prefix)."""
    files: set[Path] = set()
    pending = list(entry_points)
    while pending:
        module, _, function = pending.pop().partition(":")
        path = _module_path(module)
        if path is None or path.name == "__init__.py":
            continue
        if not function and path in files:
            continue
        files.add(path)
        pending.extend(_imports(path, function or None))
    return {p.relative_to(SOURCE_ROOT).as_posix(): _file_digest(p) for p in sorted(files)}


def run_code_digest(cfg: Config, method: str) -> str:
    """The code part of a training run's identity: one digest of the method's `training_sources`, or
    of every refvg source file for a method or model refvg does not declare (a library caller's
    own)."""
    entry = cfg.declared_methods.get(method)
    if entry is not None and entry.model in registered_models():
        sources = training_sources(entry.model)
    else:
        sources = {
            p.relative_to(SOURCE_ROOT).as_posix(): _file_digest(p)
            for p in sorted(PACKAGE_DIR.rglob("*.py"))
        }
    return hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:DIGEST_CHARS]


def registered_models() -> dict[str, str]:
    """Model name -> the module registering it, read from the `@register_model("<name>", ...)`
    decorators of refvg/models/*.py (without importing torch)."""
    found: dict[str, str] = {}
    for path in sorted(_module_dir(MODELS_PACKAGE).glob("*.py")):
        found.update(
            dict.fromkeys(_registered_in(path, *_version(path)), f"{MODELS_PACKAGE}.{path.stem}")
        )
    return found


def write_stamps(cfg: Config, out_dir: Path) -> dict[str, bool]:
    """`<out_dir>/<method>.json` for every method (sorted keys): a file is rewritten only when its
    content changes, and a stamp of a method no longer declared is removed. Returns method ->
    rewritten."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = {}
    for method in cfg.all_methods:
        text = json.dumps(method_stamp(cfg, method), indent=1, sort_keys=True) + "\n"
        path = out_dir / f"{method}.json"
        changed[method] = not path.exists() or path.read_text() != text
        if changed[method]:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(text)
            tmp.replace(path)
    for stale in out_dir.glob("*.json"):
        if stale.stem not in cfg.all_methods:
            stale.unlink()
    return changed


def _module_dir(module: str) -> Path:
    return SOURCE_ROOT.joinpath(*module.split("."))


def _module_path(module: str) -> Path | None:
    """The file of a refvg module (a package: its __init__.py); None outside refvg or for no such
    module."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = _module_dir(module)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


# Keyed by the file's state, not its path alone: a warm stage worker lives across edits.
def _parse(path: Path) -> ast.Module:
    return _parse_version(path, *_version(path))


def _file_digest(path: Path) -> str:
    return _digest_version(path, *_version(path))


def _version(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=512)
def _registered_in(path: Path, mtime_ns: int, size: int) -> tuple[str, ...]:
    names = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names += [
                deco.args[0].value
                for deco in node.decorator_list
                if isinstance(deco, ast.Call)
                and _name_of(deco.func) == "register_model"
                and deco.args
                and isinstance(deco.args[0], ast.Constant)
                and isinstance(deco.args[0].value, str)
            ]
    return tuple(names)


@lru_cache(maxsize=512)
def _parse_version(path: Path, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(path.read_bytes(), filename=str(path))


@lru_cache(maxsize=512)
def _digest_version(path: Path, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:DIGEST_CHARS]


def _imports(path: Path, function: str | None) -> tuple[str, ...]:
    return _imports_version(path, function, *_version(path))


@lru_cache(maxsize=512)
def _imports_version(path: Path, function: str | None, mtime_ns: int, size: int) -> tuple[str, ...]:
    """The refvg modules `path` imports: anywhere in it, or with `function`, at module level and
    inside that function. A package's __init__ only gathers and registers (refvg.models imports
    every model), so an import of a name from a package is not followed; one of a submodule is."""
    tree = _parse(path)
    if function is None:
        nodes = list(ast.walk(tree))
    else:
        defs = [
            n
            for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function
        ]
        if not defs:
            raise ValueError(
                f"{path}: no function {function!r} (refvg.engine.fingerprint.TRAINING_ENTRY_POINTS)"
            )
        nodes = [
            n
            for top in tree.body
            if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            for n in ast.walk(top)
        ]
        nodes += list(ast.walk(defs[0]))
    package = _package_of(path)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            found.append(base)
            found += [
                f"{base}.{alias.name}"
                for alias in node.names
                if _module_path(f"{base}.{alias.name}")
            ]
    return tuple(found)


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(SOURCE_ROOT).parent.parts)


def _name_of(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""
