"""Reader of the REFER layout (RefCOCO / RefCOCO+ / RefCOCOg) through pycocotools.

Layout: `<root>/<dataset>/refs(<split_by>).p` (or `.json`), `<root>/<dataset>/instances.json` and images
named by COCO `file_name` under `image_dir`. Every (ref, sentence) becomes one :class:`RefSample`.

Real REFER dumps contain dirty records, so each record is validated; with `on_bad_record="skip"` the
bad ones are dropped and counted per reason in :class:`SkipLog` (the prepare manifest shows it), with
`"error"` the first one raises :class:`BadRecordError` naming the file, the record and the reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Optional

import numpy as np

from refvg.config import SPLITS


class BadRecordError(ValueError):
    """A refs/instances record (or a whole file) that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class RefSample:
    sample_id: str
    ref_id: int
    sent_id: int
    ann_id: int
    image_id: int
    category_id: int
    split: str
    file_name: str
    image_width: int
    image_height: int
    bbox: tuple[float, float, float, float]
    sentence: str


@dataclass
class SkipLog:
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())), "examples": list(self.examples)}


class _Reject(Exception):
    """Internal: a record failed validation with this short reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- refs files


class _SafeUnpickler(pickle.Unpickler):
    # A REFER refs file is plain containers of str/int/float; any global (a class, a function such as
    # os.system) means the file is not what it claims, and resolving it could run code.
    def __init__(self, f, path: Path):
        super().__init__(f, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str):
        raise BadRecordError(f"{self._path}: refused to unpickle global {module}.{name}; "
                             "a refs file may hold only plain dicts, lists, strings and numbers")


def load_refs(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such refs file")
    if path.suffix == ".p":
        try:
            with open(path, "rb") as f:
                refs = _SafeUnpickler(f, path).load()
        except BadRecordError:
            raise
        except Exception as err:  # truncated or garbage pickles raise a zoo of exception types
            raise BadRecordError(f"{path}: not a readable pickle: {type(err).__name__}: {err}") from None
    elif path.suffix == ".json":
        try:
            # surrogateescape: a stray non-UTF-8 byte costs its one expression (a counted skip), not the file
            refs = json.loads(path.read_bytes().decode("utf-8-sig", errors="surrogateescape"))
        except json.JSONDecodeError as err:
            raise BadRecordError(f"{path}: not valid JSON: {err}") from None
    else:
        raise BadRecordError(f"{path}: unsupported refs format {path.suffix!r} (expected .p or .json)")
    if not isinstance(refs, list):
        raise BadRecordError(f"{path}: expected a list of ref records, got {type(refs).__name__}")
    for i, r in enumerate(refs):
        if not isinstance(r, dict):
            raise BadRecordError(f"{path}: record #{i} is a {type(r).__name__}, expected a dict")
    return refs


def find_refs_file(dataset_dir: Path, split_by: str) -> Path:
    dataset_dir = Path(dataset_dir)
    tried = [dataset_dir / f"refs({split_by}).p", dataset_dir / f"refs({split_by}).json"]
    for p in tried:
        if p.is_file():
            return p
    present = sorted(p.name for p in dataset_dir.glob("refs(*)*")) if dataset_dir.is_dir() else []
    raise FileNotFoundError(f"no refs file for split_by={split_by!r}: looked for "
                            f"{', '.join(str(p) for p in tried)}; present: {present or 'none'}")


# ---------------------------------------------------------------- shared record checks


def check_expression(value: Any, max_chars: int) -> str:
    """The cleaned expression, or a BadRecordError saying why it cannot be used (not UTF-8, empty, longer
    than `max_chars`); what prepare applies to the dataset, for inputs that arrive at inference."""
    try:
        return _expression(value, max_chars)
    except _Reject as reject:
        raise BadRecordError(reject.reason + (f" ({reject.detail})" if reject.detail else "")) from None


def _image_file_name(value: Any) -> str:
    # A file_name must stay under the image folder: "../../x" or "/etc/x" would make prepare read a file the
    # dataset does not own and bake it into the training arrays. (Checked on the name; a symlink the dataset's
    # owner put inside the folder is theirs to make.)
    if not isinstance(value, str) or not value.strip():
        raise _Reject("unsafe_image_path", f"file_name {value!r:.200}")
    parts = PurePosixPath(value.replace("\\", "/"))
    if "\0" in value or parts.is_absolute() or ".." in parts.parts or PureWindowsPath(value).drive:
        raise _Reject("unsafe_image_path", f"file_name {value!r:.200} leaves the image folder")
    return value


def _expression(value: Any, max_chars: int) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Reject("non_utf8_expression") from None
    if not isinstance(value, str):
        raise _Reject("empty_expression", f"expression is {type(value).__name__}")
    value = _undo_latin1(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from "\ud800" in JSON
        raise _Reject("non_utf8_expression") from None
    value = value.strip()
    if not value:
        raise _Reject("empty_expression")
    if len(value) > max_chars:
        raise _Reject("expression_too_long", f"{len(value)} > {max_chars} chars")
    return value


def _undo_latin1(s: str) -> str:
    # Python-2 pickles store UTF-8 bytes as str; loading with latin1 turns "café" into "cafÃ©". Undo that
    # when the text round-trips exactly (plain latin1 text almost never forms valid UTF-8 sequences).
    if s.isascii():
        return s
    try:
        return s.encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s


def _bbox(value: Any, width: int, height: int) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(v) for v in value)
    except (TypeError, ValueError):
        raise _Reject("bad_bbox", f"bbox {value!r}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise _Reject("bad_bbox", f"bbox {value!r}")
    if w <= 0 or h <= 0:
        raise _Reject("bbox_zero_area", f"bbox {[x, y, w, h]}")
    tol = 1.0  # COCO boxes are float and often overshoot the border by a fraction of a pixel
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise _Reject("bbox_out_of_image", f"bbox {[x, y, w, h]} vs image {width}x{height}")
    return (x, y, w, h)


# ---------------------------------------------------------------- the dataset


class ReferDataset:
    def __init__(self, root, dataset: str, split_by: str = "unc", image_dir=None,
                 on_bad_record: str = "skip", max_expression_chars: int = 512, check_image_files: bool = True):
        if on_bad_record not in ("skip", "error"):
            raise ValueError(f"on_bad_record must be 'skip' or 'error', got {on_bad_record!r}")
        from pycocotools.coco import COCO  # imported here: pycocotools is only needed for real data

        self.dataset_dir = Path(root) / dataset
        self.image_dir = Path(image_dir) if image_dir is not None else self.dataset_dir / "images"
        self.on_bad_record = on_bad_record
        self.max_expression_chars = max_expression_chars
        self.check_image_files = check_image_files
        self.refs_path = find_refs_file(self.dataset_dir, split_by)
        self.refs = load_refs(self.refs_path)
        self.instances_path = self.dataset_dir / "instances.json"
        if not self.instances_path.is_file():
            raise FileNotFoundError(f"{self.instances_path}: no such instances file")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
                self.coco = COCO(str(self.instances_path))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadRecordError(f"{self.instances_path}: not valid UTF-8 JSON: {err}") from None
        except (AssertionError, KeyError, TypeError, AttributeError) as err:  # pycocotools' own checks
            raise BadRecordError(f"{self.instances_path}: not a COCO instances file "
                                 f"({type(err).__name__}: {err})") from None
        self.category_names: dict[int, str] = {c["id"]: c["name"] for c in self.coco.cats.values()}
        self.skips = SkipLog()
        self._by_split: Optional[dict[str, list[RefSample]]] = None
        self._file_exists: dict[str, bool] = {}

    def samples(self, split: str) -> list[RefSample]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
        return list(self.all_samples().get(split, []))

    def all_samples(self) -> dict[str, list[RefSample]]:
        # Validated once for the whole file, so skips are counted once however often this is called.
        if self._by_split is None:
            by_split: dict[str, list[RefSample]] = {}
            for ref in self.refs:
                for s in self._ref_samples(ref):
                    by_split.setdefault(s.split, []).append(s)
            self._by_split = by_split
        return {k: list(v) for k, v in self._by_split.items()}

    def mask(self, ann_id: int) -> np.ndarray:
        if ann_id not in self.coco.anns:
            raise KeyError(f"{self.instances_path}: no annotation with id {ann_id}")
        return self.coco.annToMask(self.coco.anns[ann_id]).astype(np.uint8)

    def rle(self, ann_id: int) -> Optional[dict]:
        """The annotation's mask at original resolution as compressed COCO RLE ({"size": [h, w], "counts": str},
        JSON-ready), from its polygons or RLE; None when it carries no segmentation (a box-only dataset).
        Raises BadRecordError naming the annotation when the segmentation is malformed or covers no pixel."""
        from pycocotools import mask as mask_utils

        ann = self.coco.anns.get(ann_id)
        if ann is None:
            raise KeyError(f"{self.instances_path}: no annotation with id {ann_id}")
        if not ann.get("segmentation"):
            return None
        where = f"{self.instances_path}: annotation {ann_id} (image {ann.get('image_id')})"
        try:
            rle = self.coco.annToRLE(ann)
            pixels = int(mask_utils.area(rle))
        except Exception as err:  # pycocotools raises TypeError/ValueError/IndexError/... on malformed input
            raise BadRecordError(f"{where}: segmentation cannot be decoded: {type(err).__name__}: {err}") from None
        img = self.coco.imgs.get(ann.get("image_id"), {})
        if [int(v) for v in rle["size"]] != [img.get("height"), img.get("width")]:
            raise BadRecordError(f"{where}: segmentation is {rle['size'][1]}x{rle['size'][0]}, "
                                 f"image is {img.get('width')}x{img.get('height')}")
        if pixels == 0:
            raise BadRecordError(f"{where}: segmentation covers no pixel")
        counts = rle["counts"]
        return {"size": [int(v) for v in rle["size"]],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}

    def image_path(self, sample) -> Path:
        return self.image_dir / sample.file_name

    def _bad(self, reject: _Reject, where: str) -> None:
        msg = f"{self.refs_path}: {where}: {reject.reason}" + (f" ({reject.detail})" if reject.detail else "")
        if self.on_bad_record == "error":
            raise BadRecordError(msg)
        self.skips.add(reject.reason, f"{self.refs_path.name}: {where}")

    def _ref_samples(self, ref: dict) -> list[RefSample]:
        where = (f"ref_id={ref.get('ref_id')} ann_id={ref.get('ann_id')} image_id={ref.get('image_id')}")
        try:
            ref_id, ann_id, split = ref["ref_id"], ref["ann_id"], ref["split"]
            sentences = ref["sentences"]
            if split not in SPLITS:
                raise _Reject("unknown_split", f"split {split!r}")
            ann = self.coco.anns.get(ann_id)
            if ann is None:
                raise _Reject("missing_annotation", f"ann_id {ann_id} not in {self.instances_path.name}")
            img = self.coco.imgs.get(ann["image_id"])
            if img is None:
                raise _Reject("missing_image_record", f"image_id {ann['image_id']} not in {self.instances_path.name}")
            if ref.get("image_id", img["id"]) != img["id"]:
                raise _Reject("inconsistent_image_id", f"annotation is on image {img['id']}")
            width, height = int(img["width"]), int(img["height"])
            if width <= 0 or height <= 0:
                raise _Reject("bad_image_size", f"{width}x{height}")
            _image_file_name(img["file_name"])
            if self.check_image_files and not self._exists(img["file_name"]):
                raise _Reject("missing_image_file", str(self.image_dir / img["file_name"]))
            bbox = _bbox(ann["bbox"], width, height)
            if not isinstance(sentences, list) or not sentences:
                raise _Reject("no_sentences")
        except _Reject as reject:
            self._bad(reject, where)
            return []
        except (KeyError, TypeError) as err:
            self._bad(_Reject("malformed_record", f"{type(err).__name__}: {err}"), where)
            return []

        sent_ids = ref.get("sent_ids") or []
        out = []
        for i, sent in enumerate(sentences):
            sent_id = sent.get("sent_id") if isinstance(sent, dict) else None
            if sent_id is None:
                sent_id = sent_ids[i] if i < len(sent_ids) else i
            try:
                if not isinstance(sent, dict):
                    raise _Reject("malformed_record", f"sentence is a {type(sent).__name__}")
                text = sent.get("sent")
                if text is None or (isinstance(text, str) and not text.strip()):
                    text = sent.get("raw", text)
                text = _expression(text, self.max_expression_chars)
            except _Reject as reject:
                self._bad(reject, f"{where} sent_id={sent_id}")
                continue
            out.append(RefSample(
                sample_id=f"{ref_id}:{sent_id}", ref_id=int(ref_id), sent_id=int(sent_id), ann_id=int(ann_id),
                image_id=int(img["id"]), category_id=int(ref.get("category_id", ann["category_id"])),
                split=split, file_name=img["file_name"], image_width=width, image_height=height,
                bbox=bbox, sentence=text))
        return out

    def _exists(self, file_name: str) -> bool:
        if file_name not in self._file_exists:
            self._file_exists[file_name] = (self.image_dir / file_name).is_file()
        return self._file_exists[file_name]


# ---------------------------------------------------------------- TransVG split files


def load_transvg_split(path: Path, image_dir: Path, split: str, on_bad_record: str = "error",
                       skips: Optional[SkipLog] = None, max_expression_chars: int = 512) -> list[RefSample]:
    """Samples from a TransVG-style split file: a torch.save'd list of [image_file, ann_id_or_mask,
    bbox_xywh, phrase, ...]. ref_id = sent_id = the entry's index; image ids number the image files
    in order of first appearance; category_id = -1 (the format does not carry it)."""
    import torch
    from PIL import Image

    path, image_dir = Path(path), Path(image_dir)
    try:
        entries = torch.load(path, weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise BadRecordError(f"{path}: not a readable TransVG split file: {type(err).__name__}: {err}") from None
    if not isinstance(entries, (list, tuple)):
        raise BadRecordError(f"{path}: expected a list of entries, got {type(entries).__name__}")
    image_ids: dict[str, int] = {}
    sizes: dict[str, Optional[tuple[int, int]]] = {}
    out = []
    for i, entry in enumerate(entries):
        where = f"entry={i}"
        try:
            if not isinstance(entry, (list, tuple)) or len(entry) < 4:
                raise _Reject("malformed_record", f"entry {entry!r:.80}")
            file_name, ann, bbox, phrase = entry[0], entry[1], entry[2], entry[3]
            where = f"entry={i} image={file_name}"
            if isinstance(bbox, torch.Tensor):
                bbox = bbox.tolist()
            _image_file_name(file_name)
            if file_name not in sizes:
                try:
                    with Image.open(image_dir / file_name) as im:  # reads the header only
                        sizes[file_name] = im.size
                except (OSError, ValueError):
                    sizes[file_name] = None
            if sizes[file_name] is None:
                raise _Reject("missing_image_file", str(image_dir / file_name))
            width, height = sizes[file_name]
            box = _bbox(bbox, width, height)
            text = _expression(phrase, max_expression_chars)
        except _Reject as reject:
            msg = f"{path}: {where}: {reject.reason}" + (f" ({reject.detail})" if reject.detail else "")
            if on_bad_record == "error":
                raise BadRecordError(msg) from None
            if skips is not None:
                skips.add(reject.reason, f"{path.name}: {where}")
            continue
        image_id = image_ids.setdefault(file_name, len(image_ids))
        ann_id = int(ann) if isinstance(ann, int) and not isinstance(ann, bool) else -1
        out.append(RefSample(
            sample_id=f"{i}:{i}", ref_id=i, sent_id=i, ann_id=ann_id, image_id=image_id, category_id=-1,
            split=split, file_name=str(file_name), image_width=int(width), image_height=int(height),
            bbox=box, sentence=text))
    return out
