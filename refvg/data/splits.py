"""Which splits each dataset has, as its own files name them.

REFER (lichengunc/refer) ships one refs file per split_by, and each names its splits differently:

| dataset / split_by            | splits                              |
|-------------------------------|-------------------------------------|
| refcoco, refcoco+ / unc       | train, val, testA, testB            |
| refcoco / google              | train, val, test                    |
| refcocog / umd                | train, val, test                    |
| refcocog / google             | train, val (test where present)     |
| refclef / unc                 | train, val, testA, testB, testC     |
| refclef / berkeley            | train, val, test                    |

REFER's own `getRefIds(split="testA")` takes every ref whose split *contains* "A", so a ref stored
as "testAB" (RefClef unc) belongs to testA and to testB; `split="test"` takes every stored test
split. The same membership rule is applied here, so a split means what it means in REFER.

The TransVG / QRNet split files (`<dataset>_<split>.pth`) have their own dataset names and splits
(`SPLIT_FILE_DATASETS`), and their own box conventions per dataset.

A split name a file holds that is not in its dataset's vocabulary is an error, never a quiet skip: a
typo or a dataset read with the wrong split_by would otherwise lose part of the data unseen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class SplitVocabulary:
    """`required`: the default splits, every one of which must be present; `optional`: also prepared
    by default when the file holds them; `on_request`: prepared only when named (TransVG's
    "trainval", the union of two others); `combined`: stored names that belong to several splits."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    combined: tuple[tuple[str, tuple[str, ...]], ...] = ()
    on_request: tuple[str, ...] = ()

    @property
    def splits(self) -> tuple[str, ...]:
        return self.required + self.optional + self.on_request

    @property
    def stored_names(self) -> tuple[str, ...]:
        return self.splits + tuple(name for name, _ in self.combined)

    def members(self, stored: str) -> tuple[str, ...]:
        """The splits a ref stored under `stored` belongs to (empty: not in this vocabulary)."""
        if stored in self.splits:
            return (stored,)
        return dict(self.combined).get(stored, ())

    def default_splits(self, present: Iterable[str]) -> tuple[str, ...]:
        present = set(present)
        return self.required + tuple(s for s in self.optional if s in present)


UNC = SplitVocabulary(("train", "val", "testA", "testB"))
TRAIN_VAL_TEST = SplitVocabulary(("train", "val", "test"))
REFCLEF_UNC = SplitVocabulary(
    ("train", "val", "testA", "testB", "testC"),
    combined=(
        ("testAB", ("testA", "testB")),
        ("testBC", ("testB", "testC")),
        ("testAC", ("testA", "testC")),
    ),
)
# REFER: "test split not released yet"
GOOGLE = SplitVocabulary(("train", "val"), optional=("test",))

REFER_SPLITS: dict[tuple[str, str], SplitVocabulary] = {
    ("refcoco", "unc"): UNC,
    ("refcoco+", "unc"): UNC,
    ("refcoco", "google"): TRAIN_VAL_TEST,
    ("refcocog", "umd"): TRAIN_VAL_TEST,
    ("refcocog", "google"): GOOGLE,
    ("refclef", "unc"): REFCLEF_UNC,
    ("refclef", "berkeley"): TRAIN_VAL_TEST,
}
# A REFER-layout dataset of another name (RefShapes, a user's own) is read with its split_by's
# convention.
SPLIT_BY_SPLITS: dict[str, SplitVocabulary] = {
    "unc": UNC,
    "umd": TRAIN_VAL_TEST,
    "google": GOOGLE,
    "berkeley": TRAIN_VAL_TEST,
}


@dataclass(frozen=True)
class SplitFileFormat:
    """How one dataset's split files are written: its splits, its box convention, its entry
    length."""

    vocabulary: SplitVocabulary
    box: str  # "xywh" | "xyxy"
    # (file, ann id or mask file, box, phrase, attributes), or flickr's (file, box, phrase)
    fields: int


# TransVG's SUPPORTED_DATASETS (datasets/data_loader.py). "trainval" is train + val (referit ships
# it as a file of its own), so it is read only when named.
_TRAINVAL = ("trainval",)
SPLIT_FILE_DATASETS: dict[str, SplitFileFormat] = {
    "unc": SplitFileFormat(SplitVocabulary(UNC.required, on_request=_TRAINVAL), "xywh", 5),
    "unc+": SplitFileFormat(SplitVocabulary(UNC.required, on_request=_TRAINVAL), "xywh", 5),
    "gref": SplitFileFormat(SplitVocabulary(("train", "val")), "xywh", 5),
    "gref_umd": SplitFileFormat(TRAIN_VAL_TEST, "xywh", 5),
    "referit": SplitFileFormat(
        SplitVocabulary(TRAIN_VAL_TEST.required, on_request=_TRAINVAL), "xyxy", 5
    ),
    "flickr": SplitFileFormat(TRAIN_VAL_TEST, "xyxy", 3),
}


def split_vocabulary(
    dataset: str, split_by: str, data_format: str = "refer", custom: Optional[Iterable[str]] = None
) -> SplitVocabulary:
    """The splits of `dataset` read with `split_by` (REFER) or of its split files
    (`data_format="transvg"`); `custom` (params `data.split_vocabulary`) replaces it for a dataset
    whose files use other names."""
    if custom is not None:
        return SplitVocabulary(tuple(custom))
    if data_format == "transvg":
        if dataset not in SPLIT_FILE_DATASETS:
            raise ValueError(
                f"split files of dataset {dataset!r} are not known; TransVG's "
                f"datasets are "
                f"{', '.join(SPLIT_FILE_DATASETS)} (their box format differs "
                f"per dataset)"
            )
        return SPLIT_FILE_DATASETS[dataset].vocabulary
    vocab = REFER_SPLITS.get((dataset, split_by)) or SPLIT_BY_SPLITS.get(split_by)
    if vocab is None:
        raise ValueError(
            f"split_by {split_by!r} is not known; REFER's are {', '.join(SPLIT_BY_SPLITS)}"
        )
    return vocab
