#!/usr/bin/env python
"""Measure the defects of the reference LeGrad implementation (legrad-torch 1.1) as numbers.

Run with the reference venv made by ``scripts/reference_env.sh``::

    # random-init ViT-B-16 at 224x224 (about 1-2 min on 2 cores)
    /work/refvenv/bin/python scripts/reference_defects.py
    # the tiny fixture model (seconds)
    /work/refvenv/bin/python scripts/reference_defects.py --model fixture

Measures:
  (a) a batch of 2 different images with 1 prompt -> how many maps, and their max abs
      difference from each image's own single-image map; 2 images x 2 prompts -> exception.
  (b) positional_embedding after a call at 2x the native size (shape / values / shared with
      the user's model), then a call at a third size; also native-then-2x; and the user's own
      encode_image afterwards.
  (c) parameters of the user's model with requires_grad=False after wrapping; replaced
      forwards; prints.
  (d) timing (torch.set_num_threads(2)): median of 5 compute_legrad calls with 1 and 8
      prompts at the native size vs a plain no-grad encode_image (interleaved round-robin).
No weights are downloaded (pretrained=None, HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def load_model(kind: str, fixtures: Path):
    import open_clip

    if kind == "vit-b-16":
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16", pretrained=None)
        size = 224
    else:
        from safetensors.torch import load_file

        cfg = json.loads((fixtures / "config.json").read_text())
        model = open_clip.CLIP(
            embed_dim=cfg["embed_dim"],
            vision_cfg=cfg["vision_cfg"],
            text_cfg=cfg["text_cfg"],
            quick_gelu=cfg["quick_gelu"],
        )
        model.load_state_dict(load_file(str(fixtures / "model.safetensors")), strict=True)
        size = cfg["vision_cfg"]["image_size"]
    model.eval()
    return model, size, model.visual.proj.shape[1], model.visual.patch_size[0]


def wrap(model):
    from legrad import LeWrapper

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        w = LeWrapper(model, layer_index=-2)
    return w, buf.getvalue()


def exc_str(fn):
    try:
        fn()
        return "no exception"
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {msg[:160]}"


def ratio(t, base):
    return (
        f"{t[0]:.3f} s (min {t[1]:.3f}) = {t[0] / base[0]:.1f}x median, {t[1] / base[1]:.1f}x min"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=["vit-b-16", "fixture"], default="vit-b-16")
    ap.add_argument(
        "--fixtures", type=Path, default=HERE.parent / "tests" / "fixtures" / "reference"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    import importlib.metadata as md

    print(
        f"torch {torch.__version__}, open_clip {md.version('open_clip_torch')}, "
        f"legrad-torch {md.version('legrad-torch')}, threads {torch.get_num_threads()}, "
        f"model {args.model}, load average at start {os.getloadavg()[0]:.2f}"
    )

    pristine, S, E, p = load_model(args.model, args.fixtures)
    g = torch.Generator().manual_seed(123)
    imgs = torch.randn(2, 3, S, S, generator=g)
    t1 = F.normalize(torch.randn(1, E, generator=g), dim=-1)
    t2 = F.normalize(torch.randn(2, E, generator=g), dim=-1)
    t8 = F.normalize(torch.randn(8, E, generator=g), dim=-1)
    rows = []

    # ---------------- (a) batch merging ------------------------------------------------
    w, _ = wrap(copy.deepcopy(pristine))
    m_batch = w.compute_legrad(text_embedding=t1, image=imgs).detach()
    m0 = w.compute_legrad(text_embedding=t1, image=imgs[:1]).detach()
    m1 = w.compute_legrad(text_embedding=t1, image=imgs[1:]).detach()
    d0 = (m_batch[0, 0] - m0[0, 0]).abs().max().item()
    d1 = (m_batch[0, 0] - m1[0, 0]).abs().max().item()
    d01 = (m0 - m1).abs().max().item()
    e22 = exc_str(lambda: w.compute_legrad(text_embedding=t2, image=imgs))
    rows += [
        (
            "a",
            "2 images x 1 prompt: output shape",
            f"{tuple(m_batch.shape)} (one map for two images)",
        ),
        ("a", "max abs diff: batch map vs image-0 own map", f"{d0:.3f}"),
        ("a", "max abs diff: batch map vs image-1 own map", f"{d1:.3f}"),
        ("a", "max abs diff: image-0 vs image-1 own maps (for scale)", f"{d01:.3f}"),
        ("a", "2 images x 2 prompts", e22),
    ]

    # ---------------- (b) positional embedding --------------------------------------------
    user = copy.deepcopy(pristine)
    pos0 = user.visual.positional_embedding.detach().clone()
    w, _ = wrap(user)
    big = torch.randn(1, 3, 2 * S, 2 * S, generator=g)
    third = torch.randn(
        1,
        3,
        3 * S // 2 + (p - (3 * S // 2) % p) % p,
        3 * S // 2 + (p - (3 * S // 2) % p) % p,
        generator=g,
    )
    m_big = w.compute_legrad(text_embedding=t1, image=big).detach()
    pos1 = user.visual.positional_embedding.detach()
    same_obj = user.visual is w.visual
    cls_same = torch.equal(pos1.reshape(-1, pos0.shape[-1])[0], pos0[0])
    n_new = pos1.numel() // pos0.shape[-1]
    e_third = exc_str(lambda: w.compute_legrad(text_embedding=t1, image=third))
    e_native = exc_str(lambda: w.compute_legrad(text_embedding=t1, image=imgs[:1]))
    user_model = user
    e_user = exc_str(lambda: user_model.encode_image(imgs[:1]))
    rows += [
        (
            "b",
            f"positional_embedding after 1st call at {2 * S}x{2 * S}",
            f"{tuple(pos0.shape)} -> {tuple(pos1.shape)}; {pos0.shape[0]} -> {n_new} tokens; "
            f"CLS row kept: {cls_same}; original patch values overwritten "
            f"(in the user's model too: shared visual = {same_obj})",
        ),
        (
            "b",
            "output of that call",
            f"{tuple(m_big.shape)}, finite: {bool(torch.isfinite(m_big).all())}",
        ),
        ("b", f"then a call at {third.shape[-1]}x{third.shape[-1]}", e_third),
        ("b", f"then a call back at the native {S}x{S}", e_native),
        ("b", f"then the user's own model.encode_image at {S}x{S}", e_user),
    ]
    # native first, then 2x
    user = copy.deepcopy(pristine)
    pos0 = user.visual.positional_embedding.detach().clone()
    w, _ = wrap(user)
    w.compute_legrad(text_embedding=t1, image=imgs[:1])
    pos1 = user.visual.positional_embedding.detach()
    e_big = exc_str(lambda: w.compute_legrad(text_embedding=t1, image=big))
    rows += [
        (
            "b",
            f"fresh wrapper, 1st call at native {S}x{S}: positional_embedding",
            f"{tuple(pos0.shape)} -> {tuple(pos1.shape)}, values identical: "
            f"{torch.equal(pos0, pos1.reshape(pos0.shape))}",
        ),
        ("b", f"then a call at {2 * S}x{2 * S}", e_big),
    ]

    # ---------------- (c) side effects on the user's model ----------------------------------
    user = copy.deepcopy(pristine)
    n_total = sum(1 for _ in user.parameters())
    n_frozen_before = sum(1 for q in user.parameters() if not q.requires_grad)
    n_elem = sum(q.numel() for q in user.parameters())
    w, printed = wrap(user)
    n_frozen = sum(1 for q in user.parameters() if not q.requires_grad)
    n_elem_frozen = sum(q.numel() for q in user.parameters() if not q.requires_grad)
    vf = user.visual.__dict__.get("forward")
    replaced_visual = isinstance(vf, types.MethodType) and vf.__func__.__name__
    blocks = user.visual.transformer.resblocks
    n_blk = sum(1 for b in blocks if "forward" in b.__dict__)
    n_attn = sum(1 for b in blocks if "forward" in b.attn.__dict__)
    rows += [
        (
            "c",
            "user's parameters with requires_grad=False after wrapping",
            f"{n_frozen} of {n_total} tensors (before: {n_frozen_before}); "
            f"{n_elem_frozen / 1e6:.2f}M of {n_elem / 1e6:.2f}M values",
        ),
        (
            "c",
            "user's model.visual.forward replaced",
            f"{bool(replaced_visual)} ({replaced_visual or '-'})",
        ),
        (
            "c",
            "user's resblock / attn forwards replaced",
            f"{n_blk} / {n_attn} of {len(blocks)} blocks",
        ),
        ("c", "prints on construction", repr(printed.strip().replace("\n", " | "))),
    ]
    m_out = w.compute_legrad(text_embedding=t1, image=imgs[:1])
    rows.append(
        (
            "c",
            "output carries autograd history",
            f"requires_grad={m_out.requires_grad}, grad_fn={type(m_out.grad_fn).__name__}",
        )
    )

    # ---------------- (d) timing ------------------------------------------------------------
    if not args.skip_timing:
        n = args.repeats
        plain = copy.deepcopy(pristine)
        img = imgs[:1]

        def enc():
            with torch.no_grad():
                plain.encode_image(img)

        w, _ = wrap(copy.deepcopy(pristine))
        sys.path.insert(0, str(HERE))
        from make_golden_fixtures import oracle_legrad

        sd = {k: v.detach() for k, v in pristine.state_dict().items()}
        v = pristine.visual
        cfg = {
            "vision_cfg": {
                "patch_size": p,
                "width": v.transformer.width,
                "head_width": v.transformer.width // v.transformer.resblocks[0].attn.num_heads,
                "layers": len(v.transformer.resblocks),
            }
        }
        fns = {
            "enc": enc,
            "l1": lambda: w.compute_legrad(text_embedding=t1, image=img),
            "l8": lambda: w.compute_legrad(text_embedding=t8, image=img),
            "o8": lambda: oracle_legrad(sd, cfg, img, t8),
        }
        # Interleaved (round-robin) so that load from other processes hits every variant alike.
        for fn in fns.values():
            fn()  # warm-up
        times = {k: [] for k in fns}
        for _ in range(n):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        t_enc, t_l1, t_l8, t_o8 = (
            (statistics.median(times[k]), min(times[k])) for k in ("enc", "l1", "l8", "o8")
        )
        rows += [
            (
                "d",
                f"no-grad encode_image, 1 image {S}x{S}",
                f"{t_enc[0]:.3f} s (min {t_enc[1]:.3f})",
            ),
            (
                "d",
                "compute_legrad, 1 prompt",
                ratio(t_l1, t_enc),
            ),
            (
                "d",
                "compute_legrad, 8 prompts (image repeated 8x)",
                ratio(t_l8, t_enc),
            ),
            (
                "d",
                "for comparison: the unoptimised functional oracle "
                "(make_golden_fixtures.py), 8 prompts, one batch-1 forward",
                ratio(t_o8, t_enc),
            ),
        ]

    print()
    print(f"| | measurement ({args.model}, {S}x{S}, patch {p}) | result |")
    print("|---|---|---|")
    for k, what, res in rows:
        print(f"| {k} | {what.replace('|', '/')} | {res.replace('|', '/')} |")
    load = os.getloadavg()[0]
    print(f"\nload average at end: {load:.2f} (2 cores; above ~2 the timings are contended)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
