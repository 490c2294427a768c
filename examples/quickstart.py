"""Explain a random-init timm ViT with LeGrad, offline (the README's main-job command).

    python examples/quickstart.py --out out/quickstart

Writes ``legrad.npy`` (B, H, W), ``multi.npy`` (B, K, H, W) and ``layers.npy``
(B, L, g_h, g_w) and prints shapes and the cost of LeGrad relative to a plain forward.
With random weights the maps say nothing about the image: this shows the API and its
speed, not explanation quality.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch

from captum_legrad import LeGrad


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm architecture")
    parser.add_argument("--out", type=Path, default=Path("out/quickstart"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        labels = model(images).argmax(dim=1)

    legrad = LeGrad(model)  # all layers, the paper's mean readout
    maps = legrad.attribute(images, target=labels, output="map")
    multi = legrad.attribute_multi(images, targets=[0, 1, 2])
    per_layer = legrad.attribute_layers(images, target=labels)

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "legrad.npy", maps[:, 0].numpy())
    np.save(args.out / "multi.npy", multi.numpy())
    np.save(args.out / "layers.npy", per_layer.numpy())

    single = images[:1]

    def forward() -> None:
        with torch.no_grad():
            model(single)

    t_forward = _median_seconds(forward, args.repeats)
    t_legrad = _median_seconds(lambda: legrad.attribute(single, target=0), args.repeats)
    print(f"model {args.model} (random init), {len(legrad.layers)} layers, input 224x224")
    print(f"attribute       -> {tuple(maps.shape)}  range [{maps.min():.2f}, {maps.max():.2f}]")
    print(f"attribute_multi -> {tuple(multi.shape)}")
    print(f"attribute_layers-> {tuple(per_layer.shape)}")
    print(
        f"batch 1, {torch.get_num_threads()} threads: forward {t_forward:.3f} s, "
        f"LeGrad {t_legrad:.3f} s, ratio {t_legrad / t_forward:.2f}x"
    )
    print(f"wrote {args.out}/legrad.npy, multi.npy, layers.npy")


if __name__ == "__main__":
    main()
