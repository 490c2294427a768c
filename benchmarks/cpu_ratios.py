"""LeGrad cost as ratios measured in one run (alternating runs, medians).

    python benchmarks/cpu_ratios.py [--model vit_base_patch16_224] [--repeats 7]

Prints a Markdown table: LeGrad (all layers, last two layers) ÷ a plain no-grad forward,
and 8 targets by ``attribute_multi`` ÷ 8 single ``attribute`` calls. Random init; batch 1,
224², ``torch.set_num_threads(2)`` unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch

from captum_legrad import LeGrad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    all_layers, last_two = LeGrad(model), LeGrad(model, [-2, -1])

    def forward() -> None:
        with torch.no_grad():
            model(x)

    runs: Dict[str, Callable[[], object]] = {
        "forward": forward,
        "legrad_all": lambda: all_layers.attribute(x, target=3),
        "legrad_last2": lambda: last_two.attribute(x, target=3),
        "multi8": lambda: all_layers.attribute_multi(x, targets=list(range(8))),
    }
    for fn in runs.values():  # warm-up
        fn()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternate so drift hits every entry alike
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{args.model}, random init, batch 1, 224x224, {args.threads} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print("| measure | median s | ratio |")
    print("|---|---|---|")
    print(f"| plain forward (no grad) | {med['forward']:.3f} | 1.00 |")
    for name, label in (("legrad_all", "LeGrad, all layers"), ("legrad_last2", "LeGrad, last 2")):
        print(f"| {label} | {med[name]:.3f} | {med[name] / med['forward']:.2f}x forward |")
    ratio = med["multi8"] / (8 * med["legrad_all"])
    print(f"| 8 targets, attribute_multi | {med['multi8']:.3f} | {ratio:.2f}x eight single calls |")


if __name__ == "__main__":
    main()
