"""Serve the explorer for the browser test: the bundled model, or a tiny OpenCLIP model.

python tests/app_server.py --port 7861 [--clip | --model hf:FOLDER]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from captum_legrad import ImageTextSimilarity, app
from captum_legrad.eval.models import LoadedModel


def tiny_clip() -> LoadedModel:
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"layers": 2, "width": 32, "head_width": 16, "patch_size": 16, "image_size": 64},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    ).eval()

    def tokenizer(texts: List[str]) -> torch.Tensor:
        return torch.tensor([[1 + (sum(map(ord, t)) + i) % 60 for i in range(8)] for t in texts])

    return LoadedModel(
        model=clip,
        image_size=(64, 64),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        with_prompts=lambda prompts: ImageTextSimilarity.from_prompts(clip, prompts, tokenizer),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clip", action="store_true")
    parser.add_argument("--model", default="default", help="e.g. hf:FOLDER (a video model)")
    args = parser.parse_args()
    model = tiny_clip() if args.clip else args.model
    app.launch(model, port=args.port, block=False)
    print("serving", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
