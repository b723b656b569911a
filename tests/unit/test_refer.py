import copy
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from refvg.config import SyntheticConfig
from refvg.data.refer import (
    BadRecordError,
    RefSample,
    ReferDataset,
    SkipLog,
    find_refs_file,
    load_refs,
    load_transvg_split,
)
from refvg.data.synthetic import generate_refshapes

CFG = SyntheticConfig(num_images=20, image_size=80, val_fraction=0.2, test_fraction=0.25, seed=1)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    generate_refshapes(root / "refshapes", CFG)
    with open(root / "refshapes" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    instances = json.loads((root / "refshapes" / "instances.json").read_text())
    return root, refs, instances


def _write(tmp_path, refs, instances, fmt="json"):
    """A dataset dir with the given (possibly corrupted) records; images stay in the generated
    set."""
    d = tmp_path / "ds"
    d.mkdir(exist_ok=True)
    (d / "instances.json").write_text(json.dumps(instances))
    if fmt == "json":
        (d / "refs(unc).json").write_text(json.dumps(refs))
    else:
        with open(d / "refs(unc).p", "wb") as f:
            # Protocol 2 would spell bytes as a call to _codecs.encode, a global the reader refuses.
            pickle.dump(refs, f, protocol=4)
    return tmp_path


def test_reads_generated_set(raw):
    root, refs, _ = raw
    ds = ReferDataset(root, "refshapes")
    everything = ds.all_samples()
    assert sum(map(len, everything.values())) == sum(len(r["sentences"]) for r in refs)
    for split in ("train", "val", "testA", "testB"):
        expected = sum(len(r["sentences"]) for r in refs if r["split"] == split)
        assert len(ds.samples(split)) == expected > 0
    assert ds.skips.total == 0 and ds.skips.to_dict()["counts"] == {}
    s = ds.samples("val")[0]
    assert isinstance(s, RefSample) and s.sample_id == f"{s.ref_id}:{s.sent_id}"
    assert ds.image_path(s).is_file() and s.sentence == s.sentence.strip()
    assert ds.category_names[s.category_id] in (
        "circle",
        "square",
        "triangle",
        "diamond",
        "cross",
        "star",
    )
    with pytest.raises(ValueError, match="testA"):
        ds.samples("test")


def test_json_refs_read_like_pickle(raw, tmp_path):
    root, refs, instances = raw
    root_json = _write(tmp_path, refs, instances, "json")
    a = ReferDataset(root, "refshapes").all_samples()
    b = ReferDataset(root_json, "ds", image_dir=root / "refshapes" / "images").all_samples()
    assert a == b


def test_find_refs_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p.*refs\(umd\)\.json"):
        find_refs_file(tmp_path, "umd")
    (tmp_path / "refs(umd).json").write_text("[]")
    assert find_refs_file(tmp_path, "umd").name == "refs(umd).json"
    (tmp_path / "refs(umd).p").write_bytes(pickle.dumps([]))
    assert find_refs_file(tmp_path, "umd").name == "refs(umd).p"


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused(tmp_path, raw):
    marker = tmp_path / "pwned"
    d = tmp_path / "evil"
    d.mkdir()
    (d / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 0, "x": _Evil(marker)}], protocol=2))
    shutil.copy(raw[0] / "refshapes" / "instances.json", d / "instances.json")
    with pytest.raises(BadRecordError, match=r"refs\(unc\)\.p.*system"):
        load_refs(d / "refs(unc).p")
    with pytest.raises(BadRecordError):
        ReferDataset(tmp_path, "evil")
    assert not marker.exists()


def test_load_refs_formats(tmp_path):
    # A Python-2 style protocol-0 pickle: a list holding one dict {'sent': 'a red circle'}.
    py2 = b"(lp0\n(dp1\nS'sent'\np2\nS'a red circle'\np3\nsa."
    (tmp_path / "old.p").write_bytes(py2)
    assert load_refs(tmp_path / "old.p") == [{"sent": "a red circle"}]
    (tmp_path / "garbage.p").write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(BadRecordError, match="garbage.p"):
        load_refs(tmp_path / "garbage.p")
    (tmp_path / "refs.yaml").write_text("[]")
    with pytest.raises(BadRecordError, match="unsupported"):
        load_refs(tmp_path / "refs.yaml")
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(BadRecordError, match="list"):
        load_refs(tmp_path / "dict.json")
    (tmp_path / "ints.json").write_text("[1, 2]")
    with pytest.raises(BadRecordError, match="record #0"):
        load_refs(tmp_path / "ints.json")


def _ann(instances, ann_id):
    return next(a for a in instances["annotations"] if a["id"] == ann_id)


def _img(instances, image_id):
    return next(i for i in instances["images"] if i["id"] == image_id)


def _missing_file(refs, inst):
    _img(inst, refs[0]["image_id"])["file_name"] = "does_not_exist.png"


def _out_of_image(refs, inst):
    img = _img(inst, refs[0]["image_id"])
    _ann(inst, refs[0]["ann_id"])["bbox"] = [img["width"] - 5.0, 2.0, 20.0, 10.0]


def _zero_area(refs, inst):
    _ann(inst, refs[0]["ann_id"])["bbox"][2] = 0.0


def _empty_expression(refs, inst):
    refs[0]["sentences"][0].update(sent="   ", raw="")


def _too_long(refs, inst):
    refs[0]["sentences"][0].update(sent="red " * 200)


def _missing_image_record(refs, inst):
    _ann(inst, refs[0]["ann_id"])["image_id"] = 987654


def _missing_annotation(refs, inst):
    refs[0]["ann_id"] = 10**7


CASES = {
    "missing_image_file": _missing_file,
    "bbox_out_of_image": _out_of_image,
    "bbox_zero_area": _zero_area,
    "empty_expression": _empty_expression,
    "expression_too_long": _too_long,
    "missing_image_record": _missing_image_record,
    "missing_annotation": _missing_annotation,
}
SENTENCE_LEVEL = {"empty_expression", "expression_too_long"}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_bad_records(reason, raw, tmp_path):
    root, refs, instances = raw
    refs, instances = copy.deepcopy(refs), copy.deepcopy(instances)
    CASES[reason](refs, instances)
    bad = refs[0]
    _write(tmp_path, refs, instances)
    images = root / "refshapes" / "images"
    total = sum(len(r["sentences"]) for r in refs)

    ds = ReferDataset(
        tmp_path, "ds", image_dir=images, on_bad_record="skip", max_expression_chars=100
    )
    got = ds.all_samples()
    assert ds.skips.counts.get(reason, 0) >= 1 and set(ds.skips.counts) == {reason}
    assert ds.skips.examples and f"ref_id={bad['ref_id']}" in ds.skips.examples[0]
    kept = sum(map(len, got.values()))
    if reason in SENTENCE_LEVEL:
        assert kept == total - 1
    else:
        # A whole ref goes (every ref on the image, for a missing image file); all refs have equal
        # sentences.
        assert kept == total - ds.skips.total * len(bad["sentences"])
        assert all(s.ref_id != bad["ref_id"] for split in got.values() for s in split)
    ds.all_samples()
    assert ds.skips.total == sum(ds.skips.counts.values())  # counted once, not per call

    strict = ReferDataset(
        tmp_path, "ds", image_dir=images, on_bad_record="error", max_expression_chars=100
    )
    with pytest.raises(BadRecordError) as err:
        strict.all_samples()
    msg = str(err.value)
    assert "refs(unc).json" in msg and f"ref_id={bad['ref_id']}" in msg and reason in msg
    if reason in SENTENCE_LEVEL:
        assert f"sent_id={bad['sentences'][0]['sent_id']}" in msg


@pytest.mark.parametrize("on_bad_record", ["skip", "error"])
@pytest.mark.parametrize("stored", ["test", "trainval", "testC"])
def test_a_split_the_dataset_does_not_have_is_an_error_never_a_skip(
    raw, tmp_path, on_bad_record, stored
):
    # RefShapes is read with unc's vocabulary (train, val, testA, testB): "test" is RefCOCOg umd's,
    # "testC" RefClef's. Skipping such refs would drop a whole split unseen.
    root, refs, instances = raw
    refs = copy.deepcopy(refs)
    refs[3]["split"] = stored
    _write(tmp_path, refs, instances)
    ds = ReferDataset(
        tmp_path, "ds", image_dir=root / "refshapes" / "images", on_bad_record=on_bad_record
    )
    with pytest.raises(BadRecordError) as err:
        ds.samples("train")
    msg = str(err.value)
    assert "refs(unc).json" in msg and f"ref_id={refs[3]['ref_id']}" in msg and repr(stored) in msg


def test_non_utf8_expression_in_pickle(raw, tmp_path):
    root, refs, instances = raw
    refs = copy.deepcopy(refs)
    refs[0]["sentences"][0]["sent"] = b"\xff\xfe red"
    refs[1]["sentences"][0]["sent"] = "  caf\u00e9 circle  ".encode("utf-8")
    _write(tmp_path, refs, instances, fmt="pickle")
    ds = ReferDataset(tmp_path, "ds", image_dir=root / "refshapes" / "images")
    samples = [s for split in ds.all_samples().values() for s in split]
    assert ds.skips.counts == {"non_utf8_expression": 1}
    assert any(s.sentence == "caf\u00e9 circle" for s in samples)


def test_mask_shape(raw):
    root, refs, instances = raw
    ds = ReferDataset(root, "refshapes")
    s = ds.samples("train")[0]
    m = ds.mask(s.ann_id)
    assert m.dtype == np.uint8 and m.shape == (s.image_height, s.image_width)
    x, y, w, h = s.bbox
    assert m.sum() > 0.3 * w * h
    ys, xs = np.nonzero(m)
    assert (
        xs.min() >= x - 1 and xs.max() <= x + w + 1 and ys.min() >= y - 1 and ys.max() <= y + h + 1
    )
    with pytest.raises(KeyError):
        ds.mask(10**7)


def test_transvg_split_round_trip(raw, tmp_path):
    root, _, _ = raw
    images = root / "refshapes" / "images"
    ref = ReferDataset(root, "refshapes").samples("val")
    entries = [[s.file_name, s.ann_id, list(s.bbox), s.sentence, []] for s in ref]
    entries.append([ref[0].file_name, "mask_0.png", torch.tensor(ref[0].bbox), "  the thing ", []])
    torch.save(entries, tmp_path / "val.pth")
    got = load_transvg_split(tmp_path / "val.pth", images, "val", "unc")
    assert len(got) == len(entries)
    for s, g in zip(ref, got):
        assert (g.file_name, g.ann_id, g.bbox, g.sentence, g.split) == (
            s.file_name,
            s.ann_id,
            s.bbox,
            s.sentence,
            "val",
        )
        assert (g.image_width, g.image_height) == (s.image_width, s.image_height)
        assert g.category_id == -1 and g.sample_id == f"{g.ref_id}:{g.sent_id}"
    assert (
        got[-1].ann_id == -1
        and got[-1].sentence == "the thing"
        and got[-1].image_id == got[0].image_id
    )
    assert [g.ref_id for g in got] == list(range(len(got)))

    entries.append(["missing.png", 1, [0, 0, 1, 1], "x", []])
    torch.save(entries, tmp_path / "bad.pth")
    with pytest.raises(BadRecordError, match="missing_image_file"):
        load_transvg_split(tmp_path / "bad.pth", images, "val", "unc")
    skips = SkipLog()
    assert len(
        load_transvg_split(
            tmp_path / "bad.pth", images, "val", "unc", on_bad_record="skip", skips=skips
        )
    ) == len(got)
    assert skips.counts == {"missing_image_file": 1}
    with pytest.raises(ValueError, match="not known"):
        load_transvg_split(tmp_path / "val.pth", images, "val", "refcoco")


# ---------------------------------------------------------------- hostile files


class _Payload:
    """Unpickling this would call `fn(*args)`: the classic pickle code-execution gadget."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _payloads(marker):
    import builtins
    import subprocess

    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("gadget", ["os.system", "builtins.exec", "subprocess.Popen"])
def test_refs_pickle_carrying_code_is_refused_and_never_runs(tmp_path, raw, protocol, gadget):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[gadget]
    path = tmp_path / "refs(unc).p"
    # Deep inside an otherwise plausible record, as a tampered download would hide it.
    path.write_bytes(
        pickle.dumps(
            [{"ref_id": 0, "sentences": [{"sent": "a red circle", "x": payload}]}],
            protocol=protocol,
        )
    )
    with pytest.raises(BadRecordError, match=r"refs\(unc\)\.p: refused to unpickle global") as err:
        load_refs(path)
    assert gadget.split(".")[-1] in str(err.value)
    assert not marker.exists()


def test_refs_pickle_with_extension_or_persistent_id_opcodes_is_refused(tmp_path):
    import copyreg

    marker = tmp_path / "pwned"
    module = os.system.__module__  # "posix"
    copyreg.add_extension(module, "system", 0xF0)  # EXT opcodes name a global by a registry code
    try:
        blob = pickle.dumps([_Payload(os.system, f"touch {marker}")], protocol=2)
        assert b"\x82\xf0" in blob and b"system" not in blob  # EXT1 240, no GLOBAL opcode
        (tmp_path / "ext.p").write_bytes(blob)
        with pytest.raises(BadRecordError, match="ext.p: refused to unpickle global"):
            load_refs(
                tmp_path / "ext.p"
            )  # with the registry entry present at load time: the worst case
    finally:
        copyreg.remove_extension(module, "system", 0xF0)
    assert not marker.exists()
    (tmp_path / "persid.p").write_bytes(b"\x80\x02]q\x00P0\n\x85q\x01a.")  # PERSID opcode
    with pytest.raises(BadRecordError, match="persid.p: not a readable pickle"):
        load_refs(tmp_path / "persid.p")


def test_prepare_stage_refuses_a_refs_pickle_carrying_code(tmp_path, raw, monkeypatch):
    from refvg.config import Config
    from refvg.data.prepare import prepare_dataset

    marker = tmp_path / "pwned"
    d = tmp_path / "raw" / "evil"
    d.mkdir(parents=True)
    shutil.copy(raw[0] / "refshapes" / "instances.json", d / "instances.json")
    (d / "refs(unc).p").write_bytes(
        pickle.dumps([{"ref_id": 0, "x": _Payload(os.system, f"touch {marker}")}])
    )
    cfg = Config.model_validate(
        {
            "data": {
                "root": str(tmp_path / "raw"),
                "dataset": "evil",
                "prepared_dir": str(tmp_path / "prepared"),
            }
        }
    )
    with pytest.raises(BadRecordError, match=r"evil/refs\(unc\)\.p: refused to unpickle global"):
        prepare_dataset(cfg)  # even with on_bad_record=skip: a file that carries code is not data
    assert not marker.exists() and not (tmp_path / "prepared").exists()


UNSAFE_NAMES = [
    "../outside.png",
    "../../outside.png",
    "sub/../../outside.png",
    "/etc/passwd",
    "..\\outside.png",
    "C:\\outside.png",
    "refshapes_000000.png\x00.txt",
    "",
]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_image_paths_escaping_the_image_folder_are_refused(raw, tmp_path, name):
    root, refs, instances = raw
    images = tmp_path / "images"
    shutil.copytree(root / "refshapes" / "images", images)
    # A real image where an escaping name would land, so only the check stands between it and the
    # dataset.
    shutil.copy(next(images.iterdir()), tmp_path / "outside.png")
    refs, instances = copy.deepcopy(refs), copy.deepcopy(instances)
    _img(instances, refs[0]["image_id"])["file_name"] = name
    _write(tmp_path, refs, instances)
    ds = ReferDataset(tmp_path, "ds", image_dir=images)
    kept = [s for split in ds.all_samples().values() for s in split]
    assert ds.skips.counts.get("unsafe_image_path", 0) >= 1
    assert all(s.file_name == os.path.basename(s.file_name) for s in kept)
    strict = ReferDataset(tmp_path, "ds", image_dir=images, on_bad_record="error")
    with pytest.raises(BadRecordError, match=r"refs\(unc\)\.json: ref_id=.*unsafe_image_path"):
        strict.all_samples()


def test_transvg_split_with_an_escaping_path_is_refused(raw, tmp_path):
    root, _, _ = raw
    images = root / "refshapes" / "images"
    good = next(images.iterdir()).name
    torch.save(
        [
            [good, 1, [1, 1, 5, 5], "a circle", []],
            ["../refshapes/images/" + good, 2, [1, 1, 5, 5], "x", []],
            [7, 3, [1, 1, 5, 5], "not a name", []],
        ],
        tmp_path / "split.pth",
    )
    skips = SkipLog()
    got = load_transvg_split(
        tmp_path / "split.pth", images, "train", "unc", on_bad_record="skip", skips=skips
    )
    assert [s.file_name for s in got] == [good] and skips.counts == {"unsafe_image_path": 2}
    with pytest.raises(BadRecordError, match=r"split.pth: entry=1 .*unsafe_image_path"):
        load_transvg_split(tmp_path / "split.pth", images, "train", "unc")


def test_non_utf8_bytes_in_a_json_refs_file_cost_only_their_expression(raw, tmp_path):
    root, refs, instances = raw
    refs = copy.deepcopy(refs)
    refs[0]["sentences"][0]["sent"] = "MARKER red circle"
    _write(tmp_path, refs, instances)
    path = tmp_path / "ds" / "refs(unc).json"
    text = path.read_bytes()
    assert text.count(b"MARKER") == 1
    path.write_bytes(text.replace(b"MARKER", b"caf\xe9"))  # latin-1, not UTF-8
    ds = ReferDataset(tmp_path, "ds", image_dir=root / "refshapes" / "images")
    kept = sum(map(len, ds.all_samples().values()))
    assert ds.skips.counts == {"non_utf8_expression": 1}
    assert kept == sum(len(r["sentences"]) for r in refs) - 1


def test_absurdly_long_expression_is_a_counted_skip(raw, tmp_path):
    root, refs, instances = raw
    refs = copy.deepcopy(refs)
    refs[0]["sentences"][0]["sent"] = "the red circle " * 400_000  # 6 MB
    _write(tmp_path, refs, instances)
    ds = ReferDataset(
        tmp_path, "ds", image_dir=root / "refshapes" / "images", max_expression_chars=512
    )
    ds.all_samples()
    assert (
        ds.skips.counts == {"expression_too_long": 1}
        and f"ref_id={refs[0]['ref_id']}" in ds.skips.examples[0]
    )
    strict = ReferDataset(
        tmp_path, "ds", image_dir=root / "refshapes" / "images", on_bad_record="error"
    )
    with pytest.raises(BadRecordError, match=r"expression_too_long \(5999999 > 512 chars\)"):
        strict.all_samples()


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"images": [], "annotations": [], "categories": [] \xff}', "not valid UTF-8 JSON"),
        (b"[1, 2, 3]", "not a COCO instances file"),
        (b'{"annotations": [{"id": 1}], "images": []}', "not a COCO instances file"),
    ],
)
def test_broken_instances_file_is_named(raw, tmp_path, content, match):
    root, refs, _ = raw
    d = tmp_path / "ds"
    d.mkdir()
    (d / "refs(unc).json").write_text(json.dumps(refs))
    (d / "instances.json").write_bytes(content)
    with pytest.raises(BadRecordError, match=rf"ds/instances\.json: {match}"):
        ReferDataset(tmp_path, "ds")
