#!/usr/bin/env python
"""Threads sharing one model: correctness, throughput and memory over many calls.

    python benchmarks/bench_threads.py                   # 8 threads x 200 calls
    python benchmarks/bench_threads.py --threads 4 --calls 50

What it measures (timm ``vit_tiny_patch16_224`` at 64x64, random init, CPU):

1. ``threads``: ``--threads`` threads each make ``--calls`` ``LeGrad(model).attribute`` calls
   on ONE shared model with random targets; every result is compared with the same call made
   alone first. Reports mismatches, calls/s against the same calls made sequentially, and the
   process's resident memory before and after (growth over the run).
2. ``two models``: two different models explained in two threads at once, against the same
   calls one after the other: a ratio below 1 means the two threads overlapped (no global
   lock). With ``torch.set_num_threads(1)`` per call so that intra-op threads do not hide it.

Timing goals live here, never in tests. Results go to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from captum_legrad import LeGrad


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def tiny_vit(seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, depth=6, num_classes=10
    )
    with torch.no_grad():
        model.head.weight.normal_(std=0.2)
    return model.eval()


def in_threads(work: List[Callable[[], None]]) -> float:
    """Run each callable in its own thread, all started together; wall seconds."""
    barrier = threading.Barrier(len(work) + 1)
    errors: List[BaseException] = []

    def run(fn: Callable[[], None]) -> None:
        barrier.wait()
        try:
            fn()
        except BaseException as error:  # re-raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in work]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


def shared_model(threads: int, calls: int) -> Tuple[int, float, float, float, float]:
    model = tiny_vit(0)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, 64, 64, generator=gen) for _ in range(8)]
    plan = [
        [
            (
                int(torch.randint(8, (1,), generator=gen)),
                int(torch.randint(10, (1,), generator=gen)),
            )
            for _ in range(calls)
        ]
        for _ in range(threads)
    ]
    expected = {
        (i, t): LeGrad(model).attribute(images[i], target=t) for jobs in plan for i, t in jobs
    }
    start = time.perf_counter()
    for jobs in plan:
        for i, t in jobs:
            LeGrad(model).attribute(images[i], target=t)
    sequential = time.perf_counter() - start
    mismatches = [0]
    rss_before = rss_mib()

    def worker(jobs: List[Tuple[int, int]]) -> Callable[[], None]:
        def run() -> None:
            for i, t in jobs:
                got = LeGrad(model).attribute(images[i], target=t)
                if not torch.allclose(got, expected[(i, t)], rtol=0, atol=1e-6):
                    mismatches[0] += 1

        return run

    threaded = in_threads([worker(jobs) for jobs in plan])
    return mismatches[0], sequential, threaded, rss_before, rss_mib()


def two_models(calls: int) -> Tuple[float, float]:
    models = [tiny_vit(1), tiny_vit(2)]
    x = torch.randn(2, 3, 64, 64)

    def job(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                LeGrad(model).attribute(x, target=3)

        return run

    start = time.perf_counter()
    for model in models:
        job(model)()
    sequential = time.perf_counter() - start
    parallel = in_threads([job(model) for model in models])
    return sequential, parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200, help="calls per thread")
    parser.add_argument("--intra-op-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.intra_op_threads)
    mismatches, sequential, threaded, rss_before, rss_after = shared_model(args.threads, args.calls)
    total = args.threads * args.calls
    seq_two, par_two = two_models(max(10, args.calls // 4))
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, intra-op threads "
        f"{args.intra_op_threads}\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| calls ({args.threads} threads x {args.calls}) | {total} |")
    print(f"| results differing from the same call made alone | {mismatches} |")
    print(f"| calls/s, threads / sequential | {total / threaded:.1f} / {total / sequential:.1f} |")
    print(
        f"| resident memory before / after the threaded run | {rss_before:.0f} / "
        f"{rss_after:.0f} MiB ({rss_after - rss_before:+.1f}) |"
    )
    print(f"| two models in two threads ÷ one after the other | {par_two / seq_two:.2f}× |")


if __name__ == "__main__":
    main()
