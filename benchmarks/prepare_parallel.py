"""Parallel `prepare`: one process vs shards mapped as Prefect tasks over 2 workers, on a dataset
larger than the default.

    python benchmarks/prepare_parallel.py [--images 2000] [--image-size 320] [--letterbox 128]
                                          [--shards 8] [--workers 2]

Generates RefShapes (not timed) in a temporary folder, then runs the `prepare` flow (Prefect flow +
MLflow run, as `dvc repro` does) against one local Prefect server, in rounds that alternate the
variants so that load from other processes on the machine hits each alike:
  one process     parallel.prepare_shards 1 (the default pipeline's path)
  dask            shards on a DaskTaskRunner, `--workers` worker processes (prefect-dask)
  threads         shards on Prefect's ThreadPoolTaskRunner, `--workers` threads
Prints the median wall seconds of each flow call and the speed-up over one process. The prepared
arrays of every variant are checked identical.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import runtime  # noqa: E402  (telemetry off before prefect is imported)
from refvg.config import Config  # noqa: E402


def write_params(
    folder: Path, images: int, image_size: int, letterbox: int, parallel: dict, prepared: str
) -> Path:
    raw = Config().model_dump(mode="json")
    raw["synthetic"].update(num_images=images, image_size=image_size)
    raw["data"].update(image_size=letterbox, prepared_dir=prepared)
    raw["parallel"].update(parallel)
    path = folder / f"params-{prepared.replace('/', '-')}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=320, help="of the generated images")
    ap.add_argument(
        "--letterbox", type=int, default=128, help="data.image_size: what they are resized to"
    )
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlruns.db'}"
        home = work / "prefect"
        os.environ["PREFECT_API_URL"] = runtime.start_local_server(home)
        try:
            from flows.stages import prepare_flow
            from refvg import stages
            from refvg.config import load_config

            variants = {
                "one process": {"prepare_shards": 1},
                f"dask, {args.workers} workers": {
                    "prepare_shards": args.shards,
                    "prepare_runner": "dask",
                    "prepare_workers": args.workers,
                },
                f"threads, {args.workers} threads": {
                    "prepare_shards": args.shards,
                    "prepare_runner": "threads",
                    "prepare_workers": args.workers,
                },
            }
            params = {
                name: write_params(
                    work, args.images, args.image_size, args.letterbox, p, f"prepared/{i}"
                )
                for i, (name, p) in enumerate(variants.items())
            }
            t0 = time.perf_counter()
            summary = stages.generate(load_config(next(iter(params.values()))))
            print(
                f"generated {summary['num_images']} images "
                f"({args.image_size}px, letterboxed to {args.letterbox}) in "
                f"{time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs; {args.shards} shards",
                flush=True,
            )

            walls: dict[str, list[float]] = {name: [] for name in variants}
            for r in range(args.rounds):
                for name, path in params.items():
                    t0 = time.perf_counter()
                    prepare_flow(params=str(path))
                    walls[name].append(time.perf_counter() - t0)
                    print(f"  round {r + 1}: {name:<20} {walls[name][-1]:6.1f} s", flush=True)

            arrays = [
                np.load(work / f"prepared/{i}/refshapes/train/images.npy")
                for i in range(len(variants))
            ]
            assert all(np.array_equal(arrays[0], a) for a in arrays[1:]), (
                "variants prepared different arrays"
            )
            base = statistics.median(walls["one process"])
            print(f"\n{'variant':<22} {'median wall s':>13} {'speed-up':>9}")
            for name, w in walls.items():
                print(
                    f"{name:<22} {statistics.median(w):13.1f} {base / statistics.median(w):8.2f}x"
                )
        finally:
            runtime.stop_local_server(home)


if __name__ == "__main__":
    main()
