"""Check captum_legrad against the reference package's golden maps (no legrad needed).

    python scripts/check_parity.py [--fixtures tests/fixtures/reference]

Runs in any environment with open_clip (2.23 sequence-first or 3.x batch-first) and prints
the max abs difference between ``LeGrad(ImageTextSimilarity(clip, T), layers=[-2, -1])``
and the maps ``legrad-torch`` 1.1 produced (``scripts/make_golden_fixtures.py``).
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from pathlib import Path

import open_clip
from safetensors.torch import load_file

from captum_legrad import ImageTextSimilarity, LeGrad, discover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, default=Path("tests/fixtures/reference"))
    args = parser.parse_args()
    config = json.loads((args.fixtures / "config.json").read_text())
    model = open_clip.CLIP(**config)
    model.load_state_dict(load_file(args.fixtures / "model.safetensors"), strict=True)
    model.eval()
    inputs = load_file(args.fixtures / "inputs.safetensors")
    reference = load_file(args.fixtures / "reference.safetensors")["maps"]
    prompts = inputs["text_embeddings"]
    legrad = LeGrad(ImageTextSimilarity(model, prompts), layers=[-2, -1])
    ours = legrad.attribute_multi(inputs["images"], targets=range(prompts.shape[0]))
    layout = "batch-first" if discover(model).batch_first else "sequence-first"
    print(
        f"open_clip {version('open_clip_torch')} ({layout} blocks): max abs difference to "
        f"legrad-torch 1.1 over {tuple(reference.shape)} maps = "
        f"{(ours - reference).abs().max().item():.2e}"
    )


if __name__ == "__main__":
    main()
