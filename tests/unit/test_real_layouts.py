"""Every dataset the papers report on, in the exact shape its users have on disk: REFER's
refs(<split_by>).p as Python-2 pickles (strings as py2 `str` bytes, read back through latin-1), COCO
instances with polygons (RefCOCO/+/g) or lists of compressed RLEs (RefClef), images under REFER's
folders, and TransVG's split files with each dataset's entry shape and box convention. Each split is
kept with its count, boxes come out in the same pixel frame whatever the format, and a split the
dataset does not have fails loudly."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from refvg.config import Config, ConfigError, load_config
from refvg.data.prepare import prepare_dataset
from refvg.data.refer import BadRecordError, ReferDataset, SplitFiles
from refvg.data.splits import REFER_SPLITS, SPLIT_FILE_DATASETS, split_vocabulary
from tests.helpers import tiny_params, write_params

# Images per stored split name. RefClef unc stores some refs as "testAB" / "testBC": REFER counts
# them in both splits.
LAYOUTS = {
    ("refcoco", "unc"): {"train": 4, "val": 2, "testA": 2, "testB": 2},
    ("refcoco+", "unc"): {"train": 4, "val": 2, "testA": 2, "testB": 2},
    ("refcoco", "google"): {"train": 4, "val": 2, "test": 2},
    ("refcocog", "umd"): {"train": 4, "val": 2, "test": 2},
    ("refcocog", "google"): {"train": 4, "val": 2},
    ("refclef", "unc"): {
        "train": 4,
        "val": 2,
        "testA": 1,
        "testB": 1,
        "testC": 1,
        "testAB": 1,
        "testBC": 1,
    },
    ("refclef", "berkeley"): {"train": 4, "val": 2, "test": 2},
}
SIZES = [(48, 36), (40, 52), (57, 41)]  # width, height: never square, never the letterbox size
# Two objects per image, boxes with fractional pixels (exact in float) and borders off the pixel
# grid.
BOXES = [(3.5, 4.25, 12.0, 10.5), (20.25, 8.0, 14.5, 16.75)]
SENTENCES = [
    ["the man on the left", "café table, left"],
    ["right one"],
]  # per object: 2 + 1 sentences


class _Py2Pickler(pickle._Pickler):
    """Writes every str as Python 2's cPickle wrote a `str`: SHORT_BINSTRING / BINSTRING of its
    UTF-8 bytes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: str) -> None:
        data = obj.encode("utf-8")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str


def _image_name(dataset: str, image_id: int) -> str:
    if dataset == "refclef":  # saiapr_tc-12: <folder>/images/<id>.jpg under images/saiapr_tc-12
        return f"{image_id // 1000:02d}/images/{image_id}.jpg"
    return f"COCO_train2014_{image_id:012d}.jpg"


def _image_dir(root: Path, dataset: str) -> Path:
    return root / "images" / ("saiapr_tc-12" if dataset == "refclef" else "mscoco/images/train2014")


def _object_mask(box, width: int, height: int) -> np.ndarray:
    x, y, w, h = box
    img = Image.new("L", (width, height))
    ImageDraw.Draw(img).ellipse([x, y, x + w, y + h], fill=1)
    return np.asarray(img, dtype=np.uint8)


def write_refer(
    root: Path,
    dataset: str,
    split_by: str,
    images_per_split: dict[str, int],
    masks: dict | None = None,
) -> dict:
    """REFER's files for `dataset`, as shipped; returns {image_id: (stored split, width, height)}
    and fills `masks` with each annotation's mask as its segmentation describes it."""
    image_dir = _image_dir(root, dataset)
    images, annotations, refs, made = [], [], [], {}
    image_id, ann_id, sent_id = 9000, 100, 0
    for split, n in images_per_split.items():
        for _ in range(n):
            image_id += 7
            width, height = SIZES[image_id % len(SIZES)]
            name = _image_name(dataset, image_id)
            (image_dir / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (width, height), (image_id % 255, 90, 40)).save(
                image_dir / name, quality=95
            )
            images.append(
                {
                    "license": 1,
                    "file_name": name,
                    "coco_url": "",
                    "height": height,
                    "width": width,
                    "date_captured": "",
                    "flickr_url": "",
                    "id": image_id,
                }
            )
            made[image_id] = (split, width, height)
            for k, box in enumerate(BOXES):
                ann_id += 1
                mask = _object_mask(box, width, height)
                if (
                    dataset == "refclef"
                ):  # a list of compressed RLEs, as RefClef's instances.json has them
                    rle = mask_utils.encode(np.asfortranarray(mask))
                    segmentation = [
                        {"size": [height, width], "counts": rle["counts"].decode("ascii")}
                    ]
                else:  # polygons
                    ys, xs = np.nonzero(mask)
                    segmentation = [
                        [
                            float(xs.min()),
                            float(ys.min()),
                            float(xs.max() + 1),
                            float(ys.min()),
                            float(xs.max() + 1),
                            float(ys.max() + 1),
                            float(xs.min()),
                            float(ys.max() + 1),
                        ]
                    ]
                    mask = mask_utils.decode(
                        mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
                    )
                if masks is not None:
                    masks[ann_id] = mask
                annotations.append(
                    {
                        "segmentation": segmentation,
                        "area": float(mask.sum()),
                        "iscrowd": 0,
                        "image_id": image_id,
                        "bbox": list(box),
                        "category_id": 1 + k,
                        "id": ann_id,
                    }
                )
                sentences = []
                for text in SENTENCES[k]:
                    sentences.append(
                        {"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text}
                    )
                    sent_id += 1
                refs.append(
                    {
                        "sent_ids": [s["sent_id"] for s in sentences],
                        "file_name": f"{name[:-4]}_{ann_id}.jpg",
                        "ann_id": ann_id,
                        "ref_id": len(refs),
                        "image_id": image_id,
                        "split": split,
                        "sentences": sentences,
                        "category_id": 1 + k,
                    }
                )
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    categories = [
        {"supercategory": "thing", "id": 1, "name": "person"},
        {"supercategory": "thing", "id": 2, "name": "table"},
    ]
    (folder / "instances.json").write_text(
        json.dumps(
            {
                "info": {},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": categories,
            }
        )
    )
    with open(folder / f"refs({split_by}).p", "wb") as f:
        _Py2Pickler(f, protocol=2).dump(refs)
    return made


def expected_counts(dataset: str, split_by: str, made: dict) -> dict[str, int]:
    """Samples per split under REFER's membership rule (a "testAB" ref is in testA and in testB)."""
    vocab = split_vocabulary(dataset, split_by)
    counts: dict[str, int] = {}
    for stored, _, _ in made.values():
        for split in vocab.members(stored):
            counts[split] = counts.get(split, 0) + sum(len(s) for s in SENTENCES)
    return counts


def _cfg(root: Path, dataset: str, image_dir: Path, **data) -> Config:
    return Config.model_validate(
        tiny_params(
            data={
                "root": str(root),
                "dataset": dataset,
                "image_dir": str(image_dir),
                "prepared_dir": str(root / "prepared"),
                **data,
            }
        )
    )


@pytest.mark.parametrize("dataset,split_by", sorted(LAYOUTS))
def test_refer_dataset_as_shipped_keeps_every_split(tmp_path, dataset, split_by):
    masks: dict = {}
    made = write_refer(tmp_path, dataset, split_by, LAYOUTS[(dataset, split_by)], masks)
    image_dir = _image_dir(tmp_path, dataset)
    expected = expected_counts(dataset, split_by, made)
    assert set(expected) == set(
        REFER_SPLITS[(dataset, split_by)].default_splits(LAYOUTS[(dataset, split_by)])
    )

    ds = ReferDataset(tmp_path, dataset, split_by=split_by, image_dir=image_dir)
    got = ds.all_samples()
    assert {k: len(v) for k, v in got.items()} == expected and ds.skips.total == 0
    for split, samples in got.items():
        for s in samples:
            assert s.bbox == BOXES[s.category_id - 1]  # exactly the annotated box
            assert (s.image_width, s.image_height) == made[s.image_id][1:]
            assert split in split_vocabulary(dataset, split_by).members(made[s.image_id][0])
    assert "café table, left" in {
        s.sentence for v in got.values() for s in v
    }  # UTF-8 bytes of a py2 str

    manifest = prepare_dataset(_cfg(tmp_path, dataset, image_dir, split_by=split_by))
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == expected
    assert manifest["skipped"]["total"] == 0
    out = tmp_path / "prepared" / dataset
    for split in expected:
        records = json.loads((out / split / "samples.json").read_text())
        rles = json.loads((out / split / "masks_rle.json").read_text())
        for rec in records:
            x, y, w, h = BOXES[rec["category_id"] - 1]
            assert rec["bbox"] == [x, y, w, h] and rec["bbox_xyxy"] == [x, y, x + w, y + h]
            assert np.array_equal(mask_utils.decode(rles[rec["mask_index"]]), masks[rec["ann_id"]])


def test_refcocog_google_prepares_test_only_where_present(tmp_path):
    without = write_refer(tmp_path / "a", "refcocog", "google", {"train": 2, "val": 1})
    with_test = write_refer(tmp_path / "b", "refcocog", "google", {"train": 2, "val": 1, "test": 1})
    a = prepare_dataset(
        _cfg(tmp_path / "a", "refcocog", _image_dir(tmp_path / "a", "refcocog"), split_by="google")
    )
    b = prepare_dataset(
        _cfg(tmp_path / "b", "refcocog", _image_dir(tmp_path / "b", "refcocog"), split_by="google")
    )
    assert set(a["splits"]) == {"train", "val"} and set(b["splits"]) == {"train", "val", "test"}
    assert {k: v["samples"] for k, v in b["splits"].items()} == expected_counts(
        "refcocog", "google", with_test
    )
    assert len(without) == 3


def test_a_split_asked_for_and_absent_is_an_error(tmp_path):
    write_refer(tmp_path, "refcocog", "google", {"train": 2, "val": 1})
    cfg = _cfg(
        tmp_path,
        "refcocog",
        _image_dir(tmp_path, "refcocog"),
        split_by="google",
        splits=["train", "val", "test"],
    )
    with pytest.raises(
        BadRecordError, match=r"refs\(google\)\.p: no usable samples for split\(s\) test"
    ):
        prepare_dataset(cfg)
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_a_split_the_dataset_has_not_is_refused_in_params():
    with pytest.raises(
        ValueError, match=r"splits \['testA'\] are not splits of refcocog \(split_by umd\)"
    ):
        Config.model_validate(
            {"data": {"dataset": "refcocog", "split_by": "umd", "splits": ["train", "testA"]}}
        )


def test_refcocog_umd_test_refs_read_as_refcoco_fail_loudly(tmp_path):
    # The bug this reader once had: umd's "test" under unc's vocabulary was a quiet skip of a whole
    # split.
    write_refer(tmp_path, "refcocog", "umd", LAYOUTS[("refcocog", "umd")])
    (tmp_path / "refcocog" / "refs(unc).p").write_bytes(
        (tmp_path / "refcocog" / "refs(umd).p").read_bytes()
    )
    with pytest.raises(
        BadRecordError,
        match=r"refs\(unc\)\.p: ref #\d+ \(ref_id=\d+\): split 'test' is not a split",
    ):
        prepare_dataset(
            _cfg(tmp_path, "refcocog", _image_dir(tmp_path, "refcocog"), split_by="unc")
        )


# ------------------------------------------------------------------------------------------ split
# files


def _entry(dataset: str, file_name: str, ann_id: int, box, phrase: str) -> list:
    x, y, w, h = box
    if dataset == "flickr":
        return [file_name, [x, y, x + w, y + h], phrase]
    if dataset == "referit":
        return [file_name, f"{ann_id}_1.pth", [x, y, x + w, y + h], phrase, []]
    return [file_name, ann_id, [x, y, w, h], phrase, [("r1", ["man"]), ("r2", ["none"])]]


def write_split_files(
    root: Path, dataset: str, splits: tuple[str, ...]
) -> tuple[Path, dict[str, int]]:
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    counts, image_id, ann_id = {}, 0, 0
    for split in splits:
        entries = []
        for _ in range(2):
            image_id += 1
            width, height = SIZES[image_id % len(SIZES)]
            name = f"{image_id}.jpg"
            Image.new("RGB", (width, height), (10, 20, 30)).save(image_dir / name)
            for k, box in enumerate(BOXES):
                ann_id += 1
                entries += [_entry(dataset, name, ann_id, box, text) for text in SENTENCES[k]]
        torch.save(entries, folder / f"{dataset}_{split}.pth")
        counts[split] = len(entries)
    return image_dir, counts


@pytest.mark.parametrize("dataset", sorted(SPLIT_FILE_DATASETS))
def test_split_files_read_in_each_datasets_own_shape(tmp_path, dataset):
    vocab = SPLIT_FILE_DATASETS[dataset].vocabulary
    image_dir, counts = write_split_files(tmp_path, dataset, vocab.required)
    ds = SplitFiles(tmp_path, dataset, image_dir)
    got = ds.all_samples()
    for split in vocab.required:
        assert len(got[split]) == counts[split]
        # xywh or x1y1x2y2 on disk, the same box in the same pixel frame here
        assert {s.bbox for s in got[split]} == set(BOXES)
    manifest = prepare_dataset(_cfg(tmp_path, dataset, image_dir, format="transvg"))
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == counts
    cands = json.loads((tmp_path / "prepared" / dataset / "train" / "candidates.json").read_text())
    assert all(
        sorted(tuple(c["bbox_xyxy"]) for c in row)
        == sorted((x, y, x + w, y + h) for x, y, w, h in BOXES)
        for row in cands
    )  # the image's boxes the files refer to


def test_a_split_file_in_the_wrong_shape_is_named(tmp_path):
    image_dir, _ = write_split_files(tmp_path, "flickr", ("train", "val", "test"))
    torch.save([_entry("unc", "1.jpg", 1, BOXES[0], "x")], tmp_path / "flickr" / "flickr_val.pth")
    with pytest.raises(
        BadRecordError,
        match=r"flickr_val\.pth: entry=0: malformed_record \(a flickr entry has 3 fields",
    ):
        SplitFiles(tmp_path, "flickr", image_dir, on_bad_record="error").all_samples()
    (tmp_path / "flickr" / "flickr_testA.pth").write_bytes(
        (tmp_path / "flickr" / "flickr_val.pth").read_bytes()
    )
    with pytest.raises(
        BadRecordError, match=r"flickr_testA\.pth: split 'testA' is not a split of flickr"
    ):
        SplitFiles(tmp_path, "flickr", image_dir)


def test_unc_trainval_is_train_plus_val_and_only_on_request(tmp_path):
    image_dir, counts = write_split_files(tmp_path, "unc", ("train", "val", "testA", "testB"))
    default = prepare_dataset(_cfg(tmp_path, "unc", image_dir, format="transvg"))
    assert "trainval" not in default["splits"]
    asked = prepare_dataset(
        _cfg(tmp_path, "unc", image_dir, format="transvg", splits=["train", "trainval", "val"])
    )
    assert asked["splits"]["trainval"]["samples"] == counts["train"] + counts["val"]


# ------------------------------------------------------------------------------- end to end, per
# dataset

E2E = [("refer", d, sb) for d, sb in sorted(LAYOUTS)] + [
    ("transvg", d, None) for d in ("flickr", "gref_umd", "referit")
]


@pytest.mark.e2e
@pytest.mark.parametrize("fmt,dataset,split_by", E2E)
def test_each_dataset_prepares_trains_and_evaluates_on_its_own_splits(
    tmp_path, monkeypatch, fmt, dataset, split_by
):
    from refvg import stages

    monkeypatch.chdir(tmp_path)
    if fmt == "refer":
        write_refer(tmp_path / "raw", dataset, split_by, LAYOUTS[(dataset, split_by)])
        data = {"split_by": split_by, "image_dir": str(_image_dir(tmp_path / "raw", dataset))}
        own = REFER_SPLITS[(dataset, split_by)].default_splits(LAYOUTS[(dataset, split_by)])
    else:
        own = SPLIT_FILE_DATASETS[dataset].vocabulary.required
        image_dir, _ = write_split_files(tmp_path / "raw", dataset, own)
        data = {"format": "transvg", "image_dir": str(image_dir)}
    # Only what names the dataset changes: no code, no split list.
    write_params(
        tmp_path,
        data={"root": "raw", "dataset": dataset, **data},
        train={"epochs": 1, "batch_size": 8, "warmup_steps": 1},
        methods={"transvg": {"model": "transvg"}},
    )
    cfg = load_config("params.yaml")
    manifest = stages.prepare(cfg)
    assert list(manifest["splits"]) == list(own)
    stages.train_method(cfg, "transvg")
    stages.evaluate_method(cfg, "transvg")
    payload = json.loads((Path(cfg.eval.metrics_dir) / "transvg.json").read_text())
    assert list(payload["splits"]) == [s for s in own if s != "train"]
    assert all(0 <= m["acc@0.5"] <= 1 for m in payload["splits"].values())


def test_eval_split_not_prepared_is_an_error():
    from refvg.stages import eval_splits

    manifest = {"splits": {"train": {}, "val": {}, "test": {}}}
    assert eval_splits(Config().eval, manifest) == ["val", "test"]
    with pytest.raises(ValueError, match=r"eval.splits names \['testA'\]"):
        eval_splits(Config.model_validate({"eval": {"splits": ["val", "testA"]}}).eval, manifest)


def test_unknown_split_file_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="split files of dataset 'refcoco' are not known"):
        from refvg.config import _validate

        _validate({"data": {"format": "transvg", "dataset": "refcoco"}}, "params.yaml")
