"""Train the bundled default model: a tiny timm ViT on the synthetic shapes dataset.

    python scripts/train_default_model.py            # writes captum_legrad/data/default_model.*

Seeded and CPU-only (about 10 minutes on one core): images ``0 .. pool-1`` of the training
split (``TRAIN_SEED``) are generated once, then shuffled in epochs with random horizontal
flips. The task is multi-label (an image holds one or
two objects of different classes), trained with binary cross-entropy on the class logits.
After training, the held-out split (``TEST_SEED``) gives the accuracies stored in the JSON
beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from captum_legrad.data import CLASSES, TEST_SEED, TRAIN_SEED, ShapesDataset, build_model

ROOT = Path(__file__).resolve().parents[1]

CONFIG: Dict[str, Any] = {
    "architecture": "vit_tiny_patch16_224",
    "model_kwargs": {
        "img_size": 64,
        "patch_size": 8,
        "embed_dim": 96,
        "depth": 4,
        "num_heads": 3,
        "mlp_ratio": 2.0,
        "num_classes": len(CLASSES),
    },
    "classes": list(CLASSES),
    "image_size": 64,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "multilabel": True,
    "dataset": "shapes",
}


def _render_range(args: Tuple[int, int, int]) -> Tuple[Tensor, Tensor]:
    seed, start, stop = args
    batch = ShapesDataset(stop, seed=seed).batch(range(start, stop))
    return (batch.images * 255).round().to(torch.uint8), batch.targets


def make_pool(size: int, seed: int, workers: int) -> Tuple[Tensor, Tensor]:
    """Images ``0 .. size-1`` of the training split as uint8, with multi-hot targets."""
    chunks = [(seed, start, min(start + 500, size)) for start in range(0, size, 500)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_range, chunks)
    else:
        parts = [_render_range(chunk) for chunk in chunks]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def batches(
    images: Tensor, targets: Tensor, steps: int, batch_size: int, seed: int
) -> Iterator[Tuple[Tensor, Tensor]]:
    """Shuffled epochs over the pool with random horizontal flips (all shapes are symmetric)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(images), generator=generator), 0
        index = order[position : position + batch_size]
        position += batch_size
        x = images[index].float() / 255
        flip = torch.rand(len(index), generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        yield x, targets[index]


def normalize(images: Tensor) -> Tensor:
    mean = torch.tensor(CONFIG["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(CONFIG["std"]).view(1, -1, 1, 1)
    return (images - mean) / std


@torch.no_grad()
def evaluate(model: nn.Module, num_images: int, batch_size: int = 100) -> Dict[str, float]:
    """Held-out accuracies on the first ``num_images`` images of the test split."""
    data = ShapesDataset(num_images, seed=TEST_SEED)
    exact = top1 = per_class = 0.0
    for start in range(0, num_images, batch_size):
        batch = data.batch(range(start, min(start + batch_size, num_images)))
        logits = model(normalize(batch.images))
        predicted = logits > 0
        truth = batch.targets > 0.5
        exact += float((predicted == truth).all(dim=1).sum())
        per_class += float((predicted == truth).float().mean(dim=1).sum())
        top1 += float(truth.gather(1, logits.argmax(dim=1, keepdim=True)).sum())
    return {
        "exact_set_accuracy": exact / num_images,
        "per_class_accuracy": per_class / num_images,
        "top1_accuracy": top1 / num_images,
        "num_images": float(num_images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--workers", type=int, default=2, help="data generation processes")
    parser.add_argument("--pool", type=int, default=20000, help="training images generated")
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "captum_legrad" / "data")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(CONFIG)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def schedule(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start = time.perf_counter()
    pool_images, pool_targets = make_pool(args.pool, TRAIN_SEED + args.seed, args.workers)
    print(f"generated {args.pool} training images in {time.perf_counter() - start:.1f} s")
    loader = batches(pool_images, pool_targets, args.steps, args.batch_size, args.seed)
    running = 0.0
    for step, (images, targets) in enumerate(loader):
        loss = F.binary_cross_entropy_with_logits(model(normalize(images)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        running = 0.9 * running + 0.1 * value if step else value
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:4d}/{args.steps}  loss {running:.4f}  {elapsed:6.1f} s", flush=True)
    train_seconds = time.perf_counter() - start

    model.eval()
    metrics = evaluate(model, args.eval_images)
    print(json.dumps(metrics, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    state = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    save_file(state, str(args.out / "default_model.safetensors"))
    config = {
        **CONFIG,
        "training": {
            "script": "scripts/train_default_model.py",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "warmup": args.warmup,
            "seed": args.seed,
            "train_seed": TRAIN_SEED + args.seed,
            "threads": args.threads,
            "wall_seconds": round(train_seconds, 1),
        },
        "heldout": {"seed": TEST_SEED, **metrics},
    }
    with open(args.out / "default_model.json", "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
        handle.write("\n")
    print(f"wrote {args.out / 'default_model.safetensors'} and default_model.json")


if __name__ == "__main__":
    main()
