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

Memory with long image-token sequences (issue #21), ``--memory``::

    python benchmarks/bench_vlm.py --memory --tokens 1000 2000 4000 8000 \
        --out-memory benchmarks/results_vlm_memory.md --plot benchmarks/vlm_memory.png

A language model at real widths with a few layers (``--family llava``: a LLaVA-shaped model
whose Llama decoder has Qwen2-VL-2B's widths: 1536 wide, 12 heads with 2 KV heads, MLP 8960,
``--layers`` 2, vocabulary 32000; ``--family qwen2vl``: ``Qwen2VLForConditionalGeneration``
with the same widths, once answer maps support it), a tiny vision tower (1 layer, width
64: its cost is not what is measured) whose image gives 1,000–8,000 image tokens, a
16-token text prompt and a 32-token answer. Each measurement runs in a fresh subprocess
(``--worker``): the peak RSS (``VmHWM``, reset just before the call) minus the RSS with the
model and the inputs built ("above the model"):

* ``ours``: ``LeGrad(AnswerLogits(...)).attribute_multi(pixel_values, targets=range(32))``,
  ``sdpa`` attention;
* ``eager``: the users' fallback: ``attn_implementation="eager"``, one forward with
  ``output_attentions=True`` and gradients, then ``torch.autograd.grad`` of each answer
  token's logit with respect to every layer's attention probabilities (``retain_graph``),
  ReLU and mean over heads and queries at the image keys. Its peak is reached in the first
  token's backward (each token's gradients are reduced and freed before the next), so
  ``--eager-tokens`` (default 2) of the 32 backwards run; its time is not reported.

Times (same process as ``ours``): one no-grad forward of the whole sequence
(``logits_to_keep=T+1``: the answer positions' logits) and the 32 token maps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # the benchmarks folder is not a package
    RESULT_PREFIX,
    call_subprocess,
    current_rss_mib,
    ensure_repo_on_path,
    load_average,
    machine_line,
    markdown_table,
    medians,
    peak_rss_mib,
    ratio,
    reset_peak_rss,
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


# --------------------------------------------------------------------- long sequences

#: Qwen2-VL-2B's language-model widths.
LONG_TEXT: Dict[str, Any] = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=32000,
    max_position_embeddings=16384,
)
PATCH = 14


def side_for(tokens: int) -> int:
    """Image tokens per side for about ``tokens`` image tokens."""
    return max(1, round(tokens**0.5))


def build_long(family: str, attn: str, layers: int, tokens: int) -> nn.Module:
    """A model with real language-model widths and a tiny vision tower (random init)."""
    import transformers as tf

    torch.manual_seed(0)
    side = side_for(tokens)
    if family == "qwen2vl":
        vision_q = dict(depth=1, embed_dim=64, hidden_size=1536, num_heads=2, patch_size=PATCH)
        text_q = {**LONG_TEXT, "num_hidden_layers": layers, "vocab_size": 152000}
        config: Any = tf.Qwen2VLConfig(vision_config=vision_q, text_config=text_q)
    else:
        vision = tf.CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=side * PATCH,
            patch_size=PATCH,
        )
        text = tf.LlamaConfig(**LONG_TEXT, num_hidden_layers=layers)
        config = tf.LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=IMAGE_TOKEN,
            image_seq_length=side * side,
        )
    config._attn_implementation = attn
    return tf.AutoModelForImageTextToText.from_config(config).eval()


def long_inputs(
    family: str, model: nn.Module, tokens: int, answer_tokens: int
) -> Tuple[Tensor, Tensor, Tensor, Dict[str, Tensor]]:
    """``(prompt, answer, pixel_values, other model inputs)`` for one image."""
    gen = torch.Generator().manual_seed(1)
    side = side_for(tokens)
    config: Any = model.config
    extra: Dict[str, Tensor] = {}
    if family == "qwen2vl":  # 2x2 merged patches: a (2·side)² patch grid, one frame
        image_id = int(config.image_token_id)
        merge = config.vision_config.spatial_merge_size
        grid = torch.tensor([[1, merge * side, merge * side]])
        temporal = config.vision_config.temporal_patch_size
        pixels = torch.randn(int(grid.prod()), 3 * temporal * PATCH * PATCH, generator=gen)
        extra["image_grid_thw"] = grid
        image = torch.cat(  # <|vision_start|> image tokens <|vision_end|>, as the processor
            [
                torch.tensor([int(config.vision_start_token_id)]),
                torch.full((side * side,), image_id),
                torch.tensor([int(config.vision_end_token_id)]),
            ]
        )
    else:
        image_id = IMAGE_TOKEN
        pixels = torch.randn(1, 3, side * PATCH, side * PATCH, generator=gen)
        image = torch.full((side * side,), image_id)
    prompt = torch.cat(
        [
            torch.randint(1, 30000, (5,), generator=gen),
            image,
            torch.randint(1, 30000, (11,), generator=gen),
        ]
    )[None]
    if family == "qwen2vl":  # the processor's token types: 1 at the image tokens
        extra["mm_token_type_ids"] = (prompt == image_id).long()
    answer = torch.randint(1, 30000, (1, answer_tokens), generator=gen)
    return prompt, answer, pixels, extra


def over_sequence(extra: Dict[str, Tensor], answer_tokens: int) -> Dict[str, Tensor]:
    """The prompt's inputs for a call on prompt + answer: per-token ones (Qwen's
    ``mm_token_type_ids``) extended with 0 over the answer, as ``generate`` does."""
    full = dict(extra)
    types = full.get("mm_token_type_ids")
    if types is not None:
        full["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, answer_tokens)], dim=1)
    return full


def eager_fallback(
    model: nn.Module,
    prompt: Tensor,
    answer: Tensor,
    pixels: Tensor,
    extra: Dict[str, Tensor],
    image_id: int,
    backwards: int,
) -> Tensor:
    """The users' fallback: eager attentions with gradients, one ``autograd.grad`` per
    answer token (``backwards`` of them), ReLU-mean at the image keys."""
    ids = torch.cat([prompt, answer], dim=1)
    s, t = prompt.shape[1], answer.shape[1]
    keys = (prompt[0] == image_id).nonzero()[:, 0]
    with torch.enable_grad():
        out: Any = model(
            input_ids=ids,
            pixel_values=pixels,
            output_attentions=True,
            use_cache=False,
            **over_sequence(extra, t),
        )
        attentions = out.attentions
        maps = []
        for j in range(min(backwards, t)):
            logit = out.logits[0, s + j - 1, answer[0, j]]
            grads = torch.autograd.grad(logit, attentions, retain_graph=j + 1 < backwards)
            maps.append(sum(g[..., keys].clamp(min=0).mean(dim=(1, 2)) for g in grads))
            del grads
    return torch.stack(maps)


def run_memory_worker(args: argparse.Namespace) -> None:
    """One measurement in this fresh process: ``ours`` or ``eager`` at ``--tokens``."""
    torch.set_num_threads(args.threads)
    from captum_legrad import AnswerLogits, LeGrad

    tokens = args.tokens[0]
    method = args.worker
    attn = "eager" if method == "eager" else "sdpa"
    model = build_long(args.family, attn, args.layers, tokens)
    prompt, answer, pixels, extra = long_inputs(args.family, model, tokens, args.answer)
    sequence = torch.cat([prompt, answer], dim=1)
    t = answer.shape[1]
    image_id = int(getattr(model.config, "image_token_id", IMAGE_TOKEN))

    def forward() -> None:
        with torch.no_grad():
            model(
                input_ids=sequence,
                pixel_values=pixels,
                use_cache=False,
                logits_to_keep=t + 1,
                **over_sequence(extra, t),
            )

    def call() -> None:
        if method == "eager":
            eager_fallback(model, prompt, answer, pixels, extra, image_id, args.eager_tokens)
        else:
            explained = AnswerLogits(model, prompt, answer, **extra)
            LeGrad(explained).attribute_multi(pixels, targets=range(t), normalize=False)

    gc.collect()
    reset = reset_peak_rss()
    base = current_rss_mib()
    start = time.perf_counter()
    call()
    elapsed = time.perf_counter() - start
    peak = peak_rss_mib()
    result: Dict[str, Any] = {
        "method": method,
        "tokens": int(prompt.eq(image_id).sum()),
        "sequence": int(sequence.shape[1]),
        "base_mib": base,
        "above_mib": peak - base,
        "reset": reset,
        "seconds": elapsed,
    }
    if method == "ours" and tokens <= args.time_max:  # the forward, then the maps again (warm)
        forward()
        start = time.perf_counter()
        forward()
        result["forward_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        call()
        result["maps_seconds"] = time.perf_counter() - start
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def call_worker(args: argparse.Namespace, method: str, tokens: int) -> Dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory",
        "--worker",
        method,
        "--tokens",
        str(tokens),
        "--family",
        args.family,
        "--layers",
        str(args.layers),
        "--threads",
        str(args.threads),
        "--answer",
        str(args.answer),
        "--eager-tokens",
        str(args.eager_tokens),
        "--time-max",
        str(args.time_max),
    ]
    result, error = call_subprocess(cmd, timeout=args.worker_timeout)
    return dict(result) if result is not None else {"error": error}


def memory_main(args: argparse.Namespace) -> None:
    load_start = load_average()
    rows: List[List[str]] = []
    points: Dict[str, List[Tuple[int, float]]] = {"ours": [], "eager": []}
    ratios: List[str] = []
    for tokens in args.tokens:
        ours = call_worker(args, "ours", tokens)
        eager: Dict[str, Any] = {"error": "not run (--eager-max)"}
        if tokens <= args.eager_max:
            eager = call_worker(args, "eager", tokens)
        for name, result in (("ours", ours), ("eager", eager)):
            if "above_mib" in result:
                points[name].append((int(result["tokens"]), float(result["above_mib"])))
        cells = [str(ours.get("tokens", tokens)), str(ours.get("sequence", "-"))]
        for result in (ours, eager):
            cells.append(f"{result['above_mib']:.0f}" if "above_mib" in result else result["error"])
        if "above_mib" in ours and "above_mib" in eager:
            cells.append(f"{ours['above_mib'] / eager['above_mib']:.3f}")
        else:
            cells.append("-")
        if "maps_seconds" in ours:
            cells += [
                seconds(ours["forward_seconds"]),
                seconds(ours["maps_seconds"]),
                ratio(ours["maps_seconds"] / ours["forward_seconds"]),
            ]
            ratios.append(f"{ours['maps_seconds'] / ours['forward_seconds']:.2f}")
        else:
            cells += ["-", "-", "-"]
        rows.append(cells)
        print(" | ".join(cells), file=sys.stderr, flush=True)
    load_end = load_average()
    shape = "Qwen2-VL" if args.family == "qwen2vl" else "LLaVA (Llama decoder)"
    lines = [
        f"# bench_vlm --memory ({today()})",
        "",
        f"{machine_line()}; torch {torch.__version__}, {args.threads} threads; load average "
        f"{load_start} → {load_end} (a shared machine: other processes ran alongside).",
        f"{shape}-shaped model, random init: a decoder of {args.layers} layers at Qwen2-VL-2B's "
        "widths (1536, 12 heads / 2 KV heads, MLP 8960), a 1-layer 64-wide vision tower; "
        f"16 text tokens + the image tokens + a {args.answer}-token answer; batch 1. Peak RSS "
        "above the RSS with the model and inputs built, each in a fresh process; eager: "
        f"{args.eager_tokens} of the {args.answer} token backwards (its peak is reached in the "
        "first).",
        "",
        markdown_table(
            [
                "image tokens",
                "sequence",
                "ours (MiB)",
                "eager + output_attentions (MiB)",
                "ours ÷ eager",
                "forward (s)",
                f"{args.answer} maps (s)",
                "maps ÷ forward",
            ],
            rows,
        ),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out_memory is not None:
        args.out_memory.write_text(text + "\n")
    if args.plot is not None and points["ours"]:
        plot(points, args.plot, shape)


def plot(points: Dict[str, List[Tuple[int, float]]], path: Path, shape: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    labels = {"ours": "LeGrad (sdpa, lean)", "eager": "eager + output_attentions + autograd"}
    for name, values in points.items():
        if values:
            xs, ys = zip(*sorted(values))
            axis.plot(xs, [y / 1024 for y in ys], marker="o", label=labels[name])
    axis.set_xlabel("image tokens")
    axis.set_ylabel("peak memory above the model (GiB)")
    axis.set_title(f"{shape}-shaped, 32-token answer")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def memory_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", action="store_true", help="the long-sequence memory table")
    parser.add_argument("--family", choices=("llava", "qwen2vl"), default="llava")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (--memory)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--eager-max", type=int, default=4000, help="largest eager run")
    parser.add_argument("--eager-tokens", type=int, default=2, help="eager backwards run")
    parser.add_argument("--time-max", type=int, default=16000, help="largest timed run")
    parser.add_argument("--worker", choices=("ours", "eager"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-timeout", type=float, default=600.0)
    parser.add_argument("--out-memory", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="memory-vs-tokens PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--answer", type=int, default=32, help="answer tokens")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    memory_flags(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        if args.worker is not None:
            run_memory_worker(args)
        else:
            memory_main(args)
        return

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
