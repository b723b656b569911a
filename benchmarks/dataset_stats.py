"""Print RefShapes' statistics beside RefCOCO's, RefCOCO+'s and RefCOCOg's published ones
(markdown).

    python benchmarks/dataset_stats.py                  # RefShapes from params.yaml's `synthetic:`
    python benchmarks/dataset_stats.py --folder data/raw/refshapes          # an existing dataset
    python benchmarks/dataset_stats.py --folder data/raw/refcoco --split-by unc --no-kinds

The published columns are figures from the sources named under the table (a dash: none found there);
RefShapes' column is measured from the files with refvg.data.statistics, its expression kinds with
the dataset checker (refvg.data.refshapes_check).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refvg.config import load_config  # noqa: E402
from refvg.data.statistics import dataset_statistics  # noqa: E402

# (RefCOCO, RefCOCO+, RefCOCOg); the letters name the source of each figure (SOURCES).
PUBLISHED = {
    "images": (("19,994", "a"), ("19,992", "a"), ("26,711", "a")),
    "refs": (("50,000", "a"), ("49,856", "a"), ("54,822", "a")),
    "expressions": (("142,209", "a"), ("141,564", "a"), ("85,474", "a")),
    "referred objects per image": (("2.50", "d"), ("2.49", "d"), ("2.05", "d")),
    "expressions per ref": (("2.84", "d"), ("2.84", "d"), ("1.56", "d")),
    "words per expression": (("3.61", "b"), ("3.53", "b"), ("8.43", "b")),
    "location expressions": (("-", ""), ("none (location words forbidden)", "c"), ("-", "")),
}
SOURCES = {
    "a": "Yu et al. 2016 (RefCOCO, RefCOCO+) and Mao et al. 2016 "
    "(RefCOCOg, Google split), as summarised on "
    "https://www.codesota.com/browse/3/vision-language-models/356",
    "b": 'Hong et al., "Cost-efficient Active Learning for Referring '
    'Image Segmentation and Grounding", '
    "appendix B.4, citing Yu et al. 2016 and Nagaraja et al. "
    "2016 (RefCOCOg umd); the TensorFlow Datasets "
    "catalogue (ref_coco) rounds them to 3.5 and 8.4",
    "c": "TensorFlow Datasets catalogue, ref_coco: RefCOCO+ raters "
    "were prevented from using location words",
    "d": "derived here from the counts of (a): refs / images, expressions / refs",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument(
        "--folder", type=Path, help="an existing REFER-layout dataset (default: generate RefShapes)"
    )
    ap.add_argument("--split-by", default=None, help="default: data.split_by of --params")
    ap.add_argument(
        "--no-kinds",
        action="store_true",
        help="skip RefShapes' expression kinds (any other dataset)",
    )
    args = ap.parse_args()
    cfg = load_config(args.params)
    split_by = args.split_by or cfg.data.split_by
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            from refvg.data.synthetic import generate_refshapes

            folder = Path(tmp) / "refshapes"
            t0 = time.perf_counter()
            generate_refshapes(folder, cfg.synthetic, split_by=split_by)
            print(
                f"generated RefShapes ({cfg.synthetic.num_images} images) in "
                f"{time.perf_counter() - t0:.1f} s\n"
            )
        print(table(folder, split_by, kinds=not args.no_kinds))


def table(folder: Path, split_by: str, kinds: bool = True) -> str:
    s = dataset_statistics(folder, split_by)
    ours = {
        "images": f"{s['images']:,}",
        "refs": f"{s['refs']:,}",
        "expressions": f"{s['expressions']:,}",
        "objects per image (all annotated)": f"{s['objects_per_image']:.2f}",
        "referred objects per image": f"{s['refs'] / max(s['images'], 1):.2f}",
        "same-category objects per ref (target included)": f"{s['same_category_per_ref']:.2f}",
        "refs with a same-category other": f"{s['share_refs_with_same_category_other']:.0%}",
        "expressions per ref": f"{s['expressions_per_ref']:.2f}",
        "words per expression": f"{s['words_per_expression']:.2f}",
        "vocabulary size": f"{s['vocabulary_size']}",
    }
    if kinds:
        from refvg.data.refshapes_check import check_refshapes

        report = check_refshapes(folder, split_by)
        if report.problems:
            raise SystemExit(
                f"{folder}: {len(report.problems)} expressions fail the "
                f"checker, e.g. {report.problems[0]}"
            )
        n = max(report.sentences, 1)
        for kind in ("attribute", "location", "relation"):
            ours[f"{kind} expressions"] = f"{report.kinds[kind] / n:.0%}"
        ours["over-specified (two cues, either erasable)"] = f"{report.overspecified / n:.0%}"
        ours["refs whose expressions differ in kind"] = (
            f"{report.refs_of_mixed_kinds / max(report.refs, 1):.0%}"
        )
    lines = [
        "| statistic | RefShapes | RefCOCO | RefCOCO+ | RefCOCOg |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, value in ours.items():
        published = PUBLISHED.get(name, (("-", ""),) * 3)
        cells = [f"{v} ({src})" if src else v for v, src in published]
        lines.append(f"| {name} | {value} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"({k}) {v}" for k, v in SOURCES.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
