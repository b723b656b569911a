"""Readers of the datasets as their users have them on disk.

- :class:`ReferDataset`: the REFER layout (RefCOCO / RefCOCO+ / RefCOCOg / RefClef) through
pycocotools:
  `<root>/<dataset>/refs(<split_by>).p` (or `.json`), `<root>/<dataset>/instances.json` and images
  named by COCO `file_name` under `image_dir`. Segmentations are polygons (RefCOCO*) or lists of
  RLEs (RefClef).
- :class:`SplitFiles`: TransVG / QRNet's `<dataset>_<split>.pth` files (unc, unc+, gref, gref_umd,
referit,
  flickr), each dataset with its own entry shape and box convention.

Every (ref, sentence) becomes one :class:`RefSample`, its box xywh in the image's stored pixel
frame. Which splits a dataset has, and which stored split names belong to which split, is
`refvg.data.splits`.

Real REFER dumps contain dirty records, so each record is validated; with `on_bad_record="skip"` the
bad ones are dropped and counted per reason in :class:`SkipLog` (the prepare manifest shows it),
with `"error"` the first one raises :class:`BadRecordError` naming the file, the record and the
reason.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Optional

import numpy as np

from refvg.data.splits import SPLIT_FILE_DATASETS, SplitVocabulary, split_vocabulary


class BadRecordError(ValueError):
    """A refs/instances record (or a whole file) that cannot be used; the message says which and
    why."""


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
        return {
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "examples": list(self.examples),
        }


class _Reject(Exception):
    """Internal: a record failed validation with this short reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- refs files


class _SafeUnpickler(pickle.Unpickler):
    # A REFER refs file is plain containers of str/int/float; any global (a class, a function such
    # as os.system) means the file is not what it claims, and resolving it could run code.
    def __init__(self, f, path: Path):
        super().__init__(f, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str):
        raise BadRecordError(
            f"{self._path}: refused to unpickle global {module}.{name}; "
            "a refs file may hold only plain dicts, lists, strings and numbers"
        )


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
            raise BadRecordError(
                f"{path}: not a readable pickle: {type(err).__name__}: {err}"
            ) from None
    elif path.suffix == ".json":
        try:
            # surrogateescape: a stray non-UTF-8 byte costs its one expression (a counted skip), not
            # the file
            refs = json.loads(path.read_bytes().decode("utf-8-sig", errors="surrogateescape"))
        except json.JSONDecodeError as err:
            raise BadRecordError(f"{path}: not valid JSON: {err}") from None
    else:
        raise BadRecordError(
            f"{path}: unsupported refs format {path.suffix!r} (expected .p or .json)"
        )
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
    raise FileNotFoundError(
        f"no refs file for split_by={split_by!r}: looked for "
        f"{', '.join(str(p) for p in tried)}; present: {present or 'none'}"
    )


# ---------------------------------------------------------------- shared record checks


def check_expression(value: Any, max_chars: int) -> str:
    """The cleaned expression, or a BadRecordError saying why it cannot be used (not UTF-8, empty,
    longer than `max_chars`); what prepare applies to the dataset, for inputs that arrive at
    inference."""
    try:
        return _expression(value, max_chars)
    except _Reject as reject:
        raise BadRecordError(
            reject.reason + (f" ({reject.detail})" if reject.detail else "")
        ) from None


def _image_file_name(value: Any) -> str:
    # A file_name must stay under the image folder: "../../x" or "/etc/x" would make prepare read a
    # file the dataset does not own and bake it into the training arrays. (Checked on the name; a
    # symlink the dataset's owner put inside the folder is theirs to make.)
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
    # Python-2 pickles store UTF-8 bytes as str; loading with latin1 turns "café" into "cafÃ©". Undo
    # that when the text round-trips exactly (plain latin1 text almost never forms valid UTF-8
    # sequences).
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


def segmentation_rle(segm: Any, height: int, width: int) -> dict:
    """One compressed RLE (the union of the parts) of a COCO-style segmentation in any of the shapes
    REFER's files hold: a list of polygons (RefCOCO/+/g), a list of RLE dicts (RefClef, compressed
    counts), or one RLE dict, compressed or not. Raises BadRecordError when an RLE's size is not the
    image's."""
    from pycocotools import mask as mask_utils

    parts = [segm] if isinstance(segm, dict) else list(segm)
    if parts and all(isinstance(p, dict) for p in parts):
        rles = []
        for p in parts:
            size = [int(v) for v in p["size"]]
            if size != [height, width]:
                raise BadRecordError(
                    f"segmentation is {size[1]}x{size[0]}, image is {width}x{height}"
                )
            counts = p["counts"]
            if isinstance(counts, list):  # uncompressed
                rles.append(mask_utils.frPyObjects({"size": size, "counts": counts}, height, width))
            else:
                rles.append(
                    {
                        "size": size,
                        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
                    }
                )
    else:
        rles = mask_utils.frPyObjects(parts, height, width)  # polygons
    return mask_utils.merge(rles) if len(rles) > 1 else rles[0]


# ---------------------------------------------------------------- the dataset


class ReferDataset:
    def __init__(
        self,
        root,
        dataset: str,
        split_by: str = "unc",
        image_dir=None,
        on_bad_record: str = "skip",
        max_expression_chars: int = 512,
        check_image_files: bool = True,
        custom_splits: Optional[tuple[str, ...]] = None,
    ):
        if on_bad_record not in ("skip", "error"):
            raise ValueError(f"on_bad_record must be 'skip' or 'error', got {on_bad_record!r}")
        from pycocotools.coco import COCO  # imported here: pycocotools is only needed for real data

        self.dataset_dir = Path(root) / dataset
        self.image_dir = Path(image_dir) if image_dir is not None else self.dataset_dir / "images"
        self.on_bad_record = on_bad_record
        self.max_expression_chars = max_expression_chars
        self.check_image_files = check_image_files
        self.vocabulary = split_vocabulary(dataset, split_by, "refer", custom_splits)
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
        # pycocotools' own checks
        except (AssertionError, KeyError, TypeError, AttributeError) as err:
            raise BadRecordError(
                f"{self.instances_path}: not a COCO instances file ({type(err).__name__}: {err})"
            ) from None
        self.category_names: dict[int, str] = {c["id"]: c["name"] for c in self.coco.cats.values()}
        self.skips = SkipLog()
        self._by_split: Optional[dict[str, list[RefSample]]] = None
        self._file_exists: dict[str, bool] = {}

    def samples(self, split: str) -> list[RefSample]:
        if split not in self.vocabulary.splits:
            raise ValueError(
                f"unknown split {split!r} for {self.refs_path}; its splits: "
                f"{', '.join(self.vocabulary.splits)}"
            )
        return list(self.all_samples().get(split, []))

    def all_samples(self) -> dict[str, list[RefSample]]:
        """Samples per split. A ref stored as a combined split (RefClef's "testAB") is in each of
        its splits, as REFER's getRefIds has it."""
        # Validated once for the whole file, so skips are counted once however often this is called.
        if self._by_split is None:
            by_split: dict[str, list[RefSample]] = {}
            for i, ref in enumerate(self.refs):
                splits = self._splits_of(ref, i)
                for s in self._ref_samples(ref, splits[0]):
                    for split in splits:
                        by_split.setdefault(split, []).append(
                            s if split == s.split else replace(s, split=split)
                        )
            self._by_split = by_split
        return {k: list(v) for k, v in self._by_split.items()}

    def stored_split_counts(self) -> dict[str, int]:
        """Refs per split name as the file stores it (what the manifest reports next to what was
        kept)."""
        counts: dict[str, int] = {}
        for ref in self.refs:
            key = str(ref.get("split"))
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def _splits_of(self, ref: dict, index: int) -> tuple[str, ...]:
        stored = ref.get("split")
        members = self.vocabulary.members(stored) if isinstance(stored, str) else ()
        if not members:
            # Not a counted skip: a wrong split_by, or a split this reader does not know, would
            # silently drop a whole split (RefCOCOg umd's "test" once went that way).
            raise BadRecordError(
                f"{self.refs_path}: ref #{index} (ref_id={ref.get('ref_id')}): split {stored!r} "
                f"is not a split of this dataset (known: "
                f"{', '.join(self.vocabulary.stored_names)}); check data.dataset / data.split_by, "
                "or set data.split_vocabulary for a dataset with its own split names"
            )
        return members

    def mask(self, ann_id: int) -> np.ndarray:
        from pycocotools import mask as mask_utils

        rle = self.rle(ann_id)
        if rle is None:
            raise BadRecordError(f"{self.instances_path}: annotation {ann_id} has no segmentation")
        return mask_utils.decode(rle).astype(np.uint8)

    def rle(self, ann_id: int) -> Optional[dict]:
        """The annotation's mask at original resolution as compressed COCO RLE ({"size": [h, w],
        "counts": str}, JSON-ready), from its polygons or RLE; None when it carries no segmentation
        (a box-only dataset). Raises BadRecordError naming the annotation when the segmentation is
        malformed or covers no pixel."""
        from pycocotools import mask as mask_utils

        ann = self.coco.anns.get(ann_id)
        if ann is None:
            raise KeyError(f"{self.instances_path}: no annotation with id {ann_id}")
        if not ann.get("segmentation"):
            return None
        where = f"{self.instances_path}: annotation {ann_id} (image {ann.get('image_id')})"
        img = self.coco.imgs.get(ann.get("image_id"), {})
        try:
            rle = segmentation_rle(ann["segmentation"], int(img["height"]), int(img["width"]))
            pixels = int(mask_utils.area(rle))
        except BadRecordError as err:
            raise BadRecordError(f"{where}: {err}") from None
        # pycocotools raises TypeError/ValueError/IndexError/... on malformed input
        except Exception as err:
            raise BadRecordError(
                f"{where}: segmentation cannot be decoded: {type(err).__name__}: {err}"
            ) from None
        if pixels == 0:
            raise BadRecordError(f"{where}: segmentation covers no pixel")
        counts = rle["counts"]
        return {
            "size": [int(v) for v in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
        }

    def image_path(self, sample) -> Path:
        return self.image_dir / sample.file_name

    def candidates(self, image_id: int, skips: SkipLog):
        """Every annotated object of the image (the ground-truth proposals)."""
        from refvg.data.proposals import gt_candidates

        return gt_candidates(self, image_id, skips)

    def _bad(self, reject: _Reject, where: str) -> None:
        msg = f"{self.refs_path}: {where}: {reject.reason}" + (
            f" ({reject.detail})" if reject.detail else ""
        )
        if self.on_bad_record == "error":
            raise BadRecordError(msg)
        self.skips.add(reject.reason, f"{self.refs_path.name}: {where}")

    def _ref_samples(self, ref: dict, split: str) -> list[RefSample]:
        where = (
            f"ref_id={ref.get('ref_id')} ann_id={ref.get('ann_id')} image_id={ref.get('image_id')}"
        )
        try:
            ref_id, ann_id = ref["ref_id"], ref["ann_id"]
            sentences = ref["sentences"]
            ann = self.coco.anns.get(ann_id)
            if ann is None:
                raise _Reject(
                    "missing_annotation", f"ann_id {ann_id} not in {self.instances_path.name}"
                )
            img = self.coco.imgs.get(ann["image_id"])
            if img is None:
                raise _Reject(
                    "missing_image_record",
                    f"image_id {ann['image_id']} not in {self.instances_path.name}",
                )
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
            out.append(
                RefSample(
                    sample_id=f"{ref_id}:{sent_id}",
                    ref_id=int(ref_id),
                    sent_id=int(sent_id),
                    ann_id=int(ann_id),
                    image_id=int(img["id"]),
                    category_id=int(ref.get("category_id", ann["category_id"])),
                    split=split,
                    file_name=img["file_name"],
                    image_width=width,
                    image_height=height,
                    bbox=bbox,
                    sentence=text,
                )
            )
        return out

    def _exists(self, file_name: str) -> bool:
        if file_name not in self._file_exists:
            self._file_exists[file_name] = (self.image_dir / file_name).is_file()
        return self._file_exists[file_name]


# ---------------------------------------------------------------- TransVG split files


def load_transvg_split(
    path: Path,
    image_dir: Path,
    split: str,
    dataset: str,
    on_bad_record: str = "error",
    skips: Optional[SkipLog] = None,
    max_expression_chars: int = 512,
    image_ids: Optional[dict[str, int]] = None,
    first_ref_id: int = 0,
) -> list[RefSample]:
    """Samples from one TransVG / QRNet split file (`torch.save`d list, read with
    weights_only=True), whose entry shape and box convention depend on `dataset` (as in TransVG's
    data_loader): unc, unc+, gref, gref_umd: [file, ann_id, box xywh, phrase, attributes]; referit:
    [file, mask file, box x1y1x2y2, phrase, attributes]; flickr: [file, box x1y1x2y2, phrase]. Boxes
    come out xywh, as stored (TransVG truncates them to integers when it loads them; refvg keeps
    them exact). ref_id = sent_id = `first_ref_id` + the entry's index; `image_ids` numbers image
    files across the files of one dataset (first appearance); category_id = -1 (the format does not
    carry it)."""
    import torch
    from PIL import Image

    if dataset not in SPLIT_FILE_DATASETS:
        raise ValueError(
            f"split files of dataset {dataset!r} are not known; TransVG's "
            f"datasets are "
            f"{', '.join(SPLIT_FILE_DATASETS)}"
        )
    fmt = SPLIT_FILE_DATASETS[dataset]
    path, image_dir = Path(path), Path(image_dir)
    try:
        entries = torch.load(path, weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise BadRecordError(
            f"{path}: not a readable TransVG split file: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(entries, (list, tuple)):
        raise BadRecordError(f"{path}: expected a list of entries, got {type(entries).__name__}")
    image_ids = {} if image_ids is None else image_ids
    sizes: dict[str, Optional[tuple[int, int]]] = {}
    out = []
    for i, entry in enumerate(entries):
        where = f"entry={i}"
        try:
            if not isinstance(entry, (list, tuple)) or len(entry) != fmt.fields:
                raise _Reject(
                    "malformed_record",
                    f"a {dataset} entry has {fmt.fields} fields, got {entry!r:.120}",
                )
            if fmt.fields == 3:
                file_name, ann, bbox, phrase = entry[0], None, entry[1], entry[2]
            else:
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
            box = _bbox(_xyxy_to_xywh(bbox) if fmt.box == "xyxy" else bbox, width, height)
            text = _expression(phrase, max_expression_chars)
        except _Reject as reject:
            msg = f"{path}: {where}: {reject.reason}" + (
                f" ({reject.detail})" if reject.detail else ""
            )
            if on_bad_record == "error":
                raise BadRecordError(msg) from None
            if skips is not None:
                skips.add(reject.reason, f"{path.name}: {where}")
            continue
        image_id = image_ids.setdefault(file_name, len(image_ids))
        ann_id = int(ann) if isinstance(ann, int) and not isinstance(ann, bool) else -1
        ref_id = first_ref_id + i
        out.append(
            RefSample(
                sample_id=f"{ref_id}:{ref_id}",
                ref_id=ref_id,
                sent_id=ref_id,
                ann_id=ann_id,
                image_id=image_id,
                category_id=-1,
                split=split,
                file_name=str(file_name),
                image_width=int(width),
                image_height=int(height),
                bbox=box,
                sentence=text,
            )
        )
    return out


def _xyxy_to_xywh(value: Any) -> list:
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise _Reject("bad_bbox", f"bbox {value!r}") from None
    return [x1, y1, x2 - x1, y2 - y1]


class SplitFiles:
    """A dataset given as TransVG split files, `<root>/<dataset>/<dataset>_<split>.pth`, read like
    :class:`ReferDataset` (what `prepare` needs of a source). "trainval" is read from its own file
    where one exists (referit) and is train + val otherwise, as TransVG does; it is prepared only
    when asked for. The candidates of an image are the distinct boxes the files refer to on it (the
    format lists no others)."""

    def __init__(
        self,
        root,
        dataset: str,
        image_dir,
        on_bad_record: str = "skip",
        max_expression_chars: int = 512,
        custom_splits: Optional[tuple[str, ...]] = None,
    ):
        if on_bad_record not in ("skip", "error"):
            raise ValueError(f"on_bad_record must be 'skip' or 'error', got {on_bad_record!r}")
        self.dataset = dataset
        self.vocabulary: SplitVocabulary = split_vocabulary(
            dataset, "unc", "transvg", custom_splits
        )
        self.dataset_dir = Path(root) / dataset
        self.image_dir = Path(image_dir)
        self.instances_path = self.dataset_dir  # what messages name as the annotation source
        self.skips = SkipLog()
        if not self.dataset_dir.is_dir():
            raise FileNotFoundError(f"{self.dataset_dir}: no such folder of split files")
        self.files: dict[str, Path] = {}
        for path in sorted(self.dataset_dir.glob(f"{glob.escape(dataset)}_*.pth")):
            split = path.stem[len(dataset) + 1 :]
            if split not in self.vocabulary.splits:
                raise BadRecordError(
                    f"{path}: split {split!r} is not a split of {dataset} "
                    f"(known: {', '.join(self.vocabulary.splits)})"
                )
            self.files[split] = path
        if not self.files:
            raise FileNotFoundError(f"{self.dataset_dir}: no {dataset}_<split>.pth files")
        self._on_bad_record, self._max_chars = on_bad_record, max_expression_chars
        self._by_split: Optional[dict[str, list[RefSample]]] = None
        self._boxes: dict[int, dict[tuple, int]] = {}

    def stored_split_counts(self) -> dict[str, int]:
        """Samples per split file (a trainval made of train + val is not a file, so not counted)."""
        return {split: len(v) for split, v in self.all_samples().items() if split in self.files}

    def all_samples(self) -> dict[str, list[RefSample]]:
        if self._by_split is None:
            image_ids: dict[str, int] = {}
            by_split: dict[str, list[RefSample]] = {}
            next_id = 0
            # a fixed order, so ids do not depend on the file system
            for split in self.vocabulary.splits:
                if split not in self.files:
                    continue
                got = load_transvg_split(
                    self.files[split],
                    self.image_dir,
                    split,
                    self.dataset,
                    self._on_bad_record,
                    self.skips,
                    self._max_chars,
                    image_ids,
                    next_id,
                )
                by_split[split] = got
                next_id = max([s.ref_id for s in got], default=next_id - 1) + 1
            if "trainval" not in by_split and "train" in by_split and "val" in by_split:
                by_split["trainval"] = [
                    replace(s, split="trainval") for s in by_split["train"] + by_split["val"]
                ]
            for samples in by_split.values():
                for s in samples:
                    boxes = self._boxes.setdefault(s.image_id, {})
                    boxes.setdefault(tuple(round(v, 2) for v in s.bbox), s.ann_id)
            self._by_split = by_split
        return {k: list(v) for k, v in self._by_split.items()}

    def image_path(self, sample) -> Path:
        return self.image_dir / sample.file_name

    def rle(self, ann_id: int) -> None:
        return None  # split files carry boxes only (referit's mask files are not read)

    def candidates(self, image_id: int, skips: SkipLog):
        from refvg.data.proposals import ImageCandidates

        self.all_samples()
        boxes = np.asarray(
            [[x, y, x + w, y + h] for x, y, w, h in self._boxes.get(image_id, {})], dtype=np.float64
        ).reshape(-1, 4)
        n = len(boxes)
        return ImageCandidates(
            boxes,
            np.full(n, -1, dtype=np.int64),
            np.ones(n),
            np.asarray(list(self._boxes.get(image_id, {}).values()), dtype=np.int64),
        )


def open_source(data, check_image_files: bool = True):
    """The reader `data` (a `DataConfig`) describes: REFER files or TransVG split files."""
    if data.format == "transvg":
        return SplitFiles(
            data.root,
            data.dataset,
            data.image_dir,
            on_bad_record=data.on_bad_record,
            max_expression_chars=data.max_expression_chars,
            custom_splits=data.split_vocabulary,
        )
    return ReferDataset(
        data.root,
        data.dataset,
        split_by=data.split_by,
        image_dir=data.image_dir,
        on_bad_record=data.on_bad_record,
        max_expression_chars=data.max_expression_chars,
        check_image_files=check_image_files,
        custom_splits=data.split_vocabulary,
    )


def select_splits(data, source, by_split: dict[str, list[RefSample]]) -> tuple[str, ...]:
    """The splits to prepare: `data.splits`, or the dataset's own (its required splits, plus
    optional ones the files hold). Every one must have samples: a split asked for and absent is an
    error, not a note."""
    asked = data.splits if data.splits is not None else source.vocabulary.default_splits(by_split)
    where = getattr(source, "refs_path", None) or source.dataset_dir
    empty = [s for s in asked if not by_split.get(s)]
    if empty:
        how = "data.splits" if data.splits is not None else f"the default splits of {data.dataset}"
        raise BadRecordError(
            f"{where}: no usable samples for split(s) {', '.join(empty)} "
            f"({how}: {', '.join(asked)}); the files "
            f"hold {source.stored_split_counts()} refs per split, "
            f"skipped: {source.skips.to_dict()['counts']}"
        )
    return tuple(asked)
