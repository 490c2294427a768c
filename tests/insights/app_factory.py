"""Captum Insights apps over tiny random-init models, for the tests and as a server.

``python tests/insights/app_factory.py --port 8765 [--open-vocabulary]`` serves one on
127.0.0.1 until it is killed (the browser test starts it so).
"""

from __future__ import annotations

import argparse
from typing import Any, List, Tuple

import timm
import torch
from captum.insights import AttributionVisualizer, Batch
from captum.insights.attr_vis.features import ImageFeature
from torch import Tensor, nn

from captum_legrad import ImageTextSimilarity, insights

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)
CLASSES = [f"class {i}" for i in range(6)]
PROMPTS = ["a photo of a cat", "a photo of a dog", "a remote control", "a sofa"]
SIZE = 32


def normalize(x: Tensor) -> Tensor:
    """The input transform: images in [0, 1] -> what the model sees."""
    mean = torch.tensor(MEAN).view(-1, 1, 1)
    std = torch.tensor(STD).view(-1, 1, 1)
    return (x - mean) / std


def tiny_vit(num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=SIZE,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=num_classes,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # timm zero-inits the head: give it random values
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def classifier() -> Tuple[nn.Module, List[str]]:
    return tiny_vit(len(CLASSES)), CLASSES


def open_vocabulary() -> Tuple[nn.Module, List[str]]:
    """An image tower with 16-d embeddings and one random text embedding per prompt."""
    text = torch.randn(len(PROMPTS), 16, generator=torch.Generator().manual_seed(3))
    return ImageTextSimilarity(tiny_vit(16, seed=1), text), PROMPTS


def batches(num_classes: int, n_batches: int = 2, batch_size: int = 2) -> List[Batch]:
    """Images in [0, 1] with labels (Insights skips unlabelled examples)."""
    gen = torch.Generator().manual_seed(7)
    return [
        Batch(
            inputs=torch.rand(batch_size, 3, SIZE, SIZE, generator=gen),
            labels=torch.randint(0, num_classes, (batch_size,), generator=gen),
        )
        for _ in range(n_batches)
    ]


def score(output: Tensor) -> Tensor:
    return torch.softmax(output, dim=-1)


def build(open_vocab: bool = False, preselect: bool = False) -> Any:
    """An ``AttributionVisualizer`` with LeGrad registered."""
    insights.register()
    model, classes = open_vocabulary() if open_vocab else classifier()
    vis = AttributionVisualizer(
        models=[model],
        classes=classes,
        features=[
            ImageFeature(
                "Photo", baseline_transforms=[lambda x: x * 0], input_transforms=[normalize]
            )
        ],
        dataset=batches(len(classes)),
        score_func=(lambda o: torch.softmax(100 * o, dim=-1)) if open_vocab else score,
    )
    if preselect:
        insights.select(vis)
    return vis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--open-vocabulary", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    build(open_vocab=args.open_vocabulary).serve(blocking=True, port=args.port)


if __name__ == "__main__":
    main()
