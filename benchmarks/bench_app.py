#!/usr/bin/env python
"""The explorer's answer time: one image, the bundled model, as the page calls it.

    python benchmarks/bench_app.py

Prints the median wall time of ``Explorer.explain`` (LeGrad top-1, the per-layer maps, the
downloads written) over 10 calls after one warm-up, and the same with the three baselines.
Goal: under 2 s for one image with the bundled model on a 2-core CPU.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from captum_legrad.app import BASELINES, Explorer, Settings
from captum_legrad.data import ShapesDataset
from captum_legrad.eval.models import load_model


def main() -> None:
    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp())
    array = (ShapesDataset(1, seed=1)[0].image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(array).save(folder / "shape.png")
    explorer = Explorer(load_model("default"), workdir=folder)
    files = [str(folder / "shape.png")]
    print("| request | median seconds (10 calls) |")
    print("|---|---:|")
    for name, settings in (
        ("top-1 class, all layers", Settings()),
        ("top-1 class + 3 baselines", Settings(baselines=tuple(BASELINES))),
    ):
        explorer.explain(files, settings)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            explorer.explain(files, settings)
            times.append(time.perf_counter() - start)
        print(f"| {name} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
