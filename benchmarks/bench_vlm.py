"""LeGrad on a vision-language model's answer: the cost of the maps ÷ one forward.

    python benchmarks/bench_vlm.py            # ~1-2 min on 2 idle cores
    python benchmarks/bench_vlm.py --quick    # smaller model, fewer repeats

A random-init ``LlavaForConditionalGeneration`` (nothing is downloaded), tiny but not
trivial: a CLIP vision tower (4 layers, width 256, 224² images, patch 14: 256 image
tokens) and a Llama language model (8 layers, width 512, 8 heads with 2 KV heads,
vocabulary 32000), ``sdpa`` attention, batch 1, a 16-token text prompt around the image
and a 32-token answer. Measured round-robin after one warm-up call each (so load from
other processes hits all alike), medians and ratios of medians:

* ``forward``: one no-grad forward of the VLM on the whole sequence (prompt + answer),
  the logits of every position, as ``model(**inputs)`` computes them (the goal's baseline);
* ``forward, logits of the last T+1 positions only`` (``logits_to_keep``): a stricter
  baseline without the full-vocabulary head over the prompt;
* ``maps (32 tokens)``: ``LeGrad(AnswerLogits(...)).attribute_multi(pixel_values,
  targets=range(32))``, all decoder layers: one map per answer token;
* ``whole answer``: ``LeGrad(AnswerLogits(..., reduce="sum")).attribute(pixel_values)``;
* ``maps, last layer``: ``layers=[-1]``.

Goal (issue #14): maps for a 32-token answer ≤ 3× one forward.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # the benchmarks folder is not a package
    ensure_repo_on_path,
    load_average,
    machine_line,
    markdown_table,
    medians,
    ratio,
    round_robin,
    seconds,
    today,
)

ensure_repo_on_path()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOAL = 3.0
IMAGE_TOKEN = 31999


def build(quick: bool) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(
        hidden_size=128 if quick else 256,
        intermediate_size=512 if quick else 1024,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=4,
        image_size=112 if quick else 224,
        patch_size=14,
    )
    text = tf.LlamaConfig(
        hidden_size=256 if quick else 512,
        intermediate_size=704 if quick else 1408,
        num_hidden_layers=4 if quick else 8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=1024,
    )
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    config._attn_implementation = "sdpa"
    return tf.LlavaForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--answer", type=int, default=32, help="answer tokens")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from captum_legrad import AnswerLogits, LeGrad

    model = build(args.quick)
    vision: Any = model.config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    gen = torch.Generator().manual_seed(1)
    prompt = torch.cat(
        [
            torch.randint(1, 30000, (5,), generator=gen),
            torch.full((n_image,), IMAGE_TOKEN),
            torch.randint(1, 30000, (11,), generator=gen),
        ]
    )[None]
    answer = torch.randint(1, 30000, (1, args.answer), generator=gen)
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=gen)
    sequence = torch.cat([prompt, answer], dim=1)
    t = answer.shape[1]

    per_token = LeGrad(AnswerLogits(model, prompt, answer))
    last = LeGrad(AnswerLogits(model, prompt, answer), layers=[-1])
    whole = LeGrad(AnswerLogits(model, prompt, answer, reduce="sum"))

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=sequence, pixel_values=pixels, use_cache=False)

    def forward_answer() -> None:
        with torch.no_grad():
            model(input_ids=sequence, pixel_values=pixels, use_cache=False, logits_to_keep=t + 1)

    fns: Dict[str, Callable[[], object]] = {
        "forward": forward,
        f"forward, logits of the last {t + 1} positions only": forward_answer,
        f"maps ({t} tokens)": lambda: per_token.attribute_multi(pixels, targets=range(t)),
        "whole answer": lambda: whole.attribute(pixels),
        f"maps ({t} tokens), last layer": lambda: last.attribute_multi(pixels, targets=range(t)),
    }
    repeats = args.repeats or (3 if args.quick else 5)
    load_start = load_average()
    times = medians(round_robin(fns, repeats))
    load_end = load_average()
    base = times["forward"]
    rows = [[name, seconds(value), ratio(value / base)] for name, value in times.items()]
    main_ratio = times[f"maps ({t} tokens)"] / base
    strict = (
        times[f"maps ({t} tokens)"] / times[f"forward, logits of the last {t + 1} positions only"]
    )
    lines = [
        f"# bench_vlm ({today()})",
        "",
        f"{machine_line()}; torch {torch.__version__}, {args.threads} threads; load "
        f"average {load_start} → {load_end}.",
        f"LLaVA (random init): vision {vision.num_hidden_layers}×{vision.hidden_size}, "
        f"{n_image} image tokens; Llama {model.config.text_config.num_hidden_layers}×"
        f"{model.config.text_config.hidden_size}, GQA "
        f"{model.config.text_config.num_attention_heads}/"
        f"{model.config.text_config.num_key_value_heads}; sequence {sequence.shape[1]} tokens, "
        f"answer {t}; sdpa; batch 1; {repeats} repeats, medians.",
        "",
        markdown_table(["what", "seconds", "÷ forward"], rows),
        "",
        f"Maps for a {t}-token answer ÷ one forward: {ratio(main_ratio)} "
        f"(goal ≤ {GOAL:.0f}×: {'met' if main_ratio <= GOAL else 'NOT met'}); ÷ a forward "
        f"computing only the answer positions' logits: {ratio(strict)}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
