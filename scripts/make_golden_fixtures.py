#!/usr/bin/env python
"""Generate (or check) the golden LeGrad fixtures from the authors' reference code.

Generate (needs the reference venv made by ``scripts/reference_env.sh``, i.e.
``legrad-torch==1.1`` + ``open-clip-torch==2.23.0``)::

    /work/refvenv/bin/python scripts/make_golden_fixtures.py --out tests/fixtures/reference

Check (needs only torch + safetensors + any open_clip, 2.23 or 3.x; legrad is NOT
imported)::

    python scripts/make_golden_fixtures.py --check tests/fixtures/reference

At a larger input size (the authors' 448² usage on 224² models; issue #16)::

    /work/refvenv/bin/python scripts/make_golden_fixtures.py --scale 2 \
        --out tests/fixtures/reference_2x

writes, for a small OpenCLIP CLIP (the same weights as above), CoCa and SigLIP (open_clip's
``TimmModel`` around a tiny timm SigLIP trunk), the reference's maps for images of twice the
native size (64² on 32² models): ``<model>.json`` (how to build it), ``<model>.safetensors``
(the pristine ``visual`` state dict), ``<model>_inputs.safetensors`` (``images``,
``text_embeddings``), ``<model>_reference.safetensors`` (``maps`` (n_images, n_prompts, H, W):
``LeWrapper(model, layer_index=-2).compute_legrad(T[k:k+1], image=images[i:i+1])``, one image
and one prompt per call, SigLIP with ``apply_correction=False``) and ``meta.json``.

What is generated (all tensors float32, CPU):

* ``config.json``           -- kwargs for ``open_clip.CLIP(**config)`` (embed_dim, vision_cfg,
                               text_cfg, quick_gelu).
* ``model.safetensors``     -- the *pristine* state dict of that random-init model (saved before
                               the reference wrapper touched anything).
* ``inputs.safetensors``    -- ``images`` (n_images, 3, S, S) and ``text_embeddings``
                               (n_prompts, embed_dim), L2-normalised rows.
* ``reference.safetensors`` -- ``maps`` (n_images, n_prompts, g*p, g*p): legrad 1.1
                               ``LeWrapper(model, layer_index=-2).compute_legrad(text_embedding=T,
                               image=images[i:i+1])[0]`` for each image separately;
                               ``image_features`` (n_images, embed_dim): pristine
                               ``model.encode_image(images)`` under open_clip 2.23.
* ``oracle.safetensors``    -- an open_clip-independent re-computation (functional ViT forward
                               from the state dict): ``maps`` (same shape as the reference maps),
                               ``grid_maps_per_layer`` (n_images, n_prompts, n_layers, g, g), the
                               raw per-layer maps before upsampling/summing/min-max, and
                               ``grid_maps`` (n_images, n_prompts, g, g) = their sum, min-max
                               normalised per (image, prompt).
* ``meta.json``             -- versions, seed, the exact calls, shapes, the positional-embedding
                               observation and the oracle-vs-reference difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

SEED = 0
N_IMAGES = 3
N_PROMPTS = 4
LAYER_INDEX = -2  # reference default: the last two blocks

# Small CLIP: 3 vision blocks of width 40 with 5 heads of 8, patch 8 on 32x32 images
# (grid 4x4, N = 17 tokens), joint embedding 32. Distinct sizes everywhere so that an
# axis mix-up in a re-implementation cannot go unnoticed by shape alone.
CONFIG = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {
        "layers": 3,
        "width": 40,
        "head_width": 8,
        "mlp_ratio": 4.0,
        "patch_size": 8,
        "image_size": 32,
        # Explicit so that a newer open_clip with other defaults builds the same net.
        "ls_init_value": None,
        "patch_dropout": 0.0,
        "attentional_pool": False,
        "no_ln_pre": False,
        "pos_embed_type": "learnable",
        "final_ln_after_pool": False,
        "pool_type": "tok",
        "output_tokens": False,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 100,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "mlp_ratio": 4.0,
        "ls_init_value": None,
        "embed_cls": False,
        "pad_id": 0,
        "no_causal_mask": False,
        "final_ln_after_pool": False,
        "pool_type": "argmax",
        "proj_bias": False,
        "output_tokens": False,
    },
}


# --------------------------------------------------------------------------------------
# Independent oracle: a functional OpenCLIP ViT forward built only from the state dict.
# --------------------------------------------------------------------------------------
def oracle_forward(sd: dict, cfg: dict, images: torch.Tensor):
    """Return (image_features, Z list, A list) for the vision tower.

    Z[l] is the residual stream after block l, (B, N, D); A[l] the post-softmax per-head
    attention of block l, (B, H, N, N), on the autograd path to Z[l].
    """
    v = cfg["vision_cfg"]
    p, D = v["patch_size"], v["width"]
    H = D // v["head_width"]
    dh = D // H
    ln = lambda x, name: F.layer_norm(x, (D,), sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731

    x = F.conv2d(images, sd["visual.conv1.weight"], stride=p)  # conv1 has no bias in open_clip
    B = x.shape[0]
    x = x.flatten(2).transpose(1, 2)  # (B, n, D), row-major over the grid
    cls = sd["visual.class_embedding"].reshape(1, 1, D).expand(B, 1, D)
    x = torch.cat([cls, x], dim=1)
    x = x + sd["visual.positional_embedding"].reshape(1, -1, D)
    x = ln(x, "visual.ln_pre")
    N = x.shape[1]

    Zs, As = [], []
    for li in range(v["layers"]):
        pre = f"visual.transformer.resblocks.{li}."
        h = ln(x, pre + "ln_1")
        qkv = h @ sd[pre + "attn.in_proj_weight"].T + sd[pre + "attn.in_proj_bias"]
        q, k, vv = qkv.split(D, dim=-1)
        q, k, vv = (t.reshape(B, N, H, dh).transpose(1, 2) for t in (q, k, vv))  # (B, H, N, dh)
        A = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(dh), dim=-1)  # (B, H, N, N)
        o = (A @ vv).transpose(1, 2).reshape(B, N, D)
        o = o @ sd[pre + "attn.out_proj.weight"].T + sd[pre + "attn.out_proj.bias"]
        x = x + o
        h = ln(x, pre + "ln_2")
        h = F.gelu(h @ sd[pre + "mlp.c_fc.weight"].T + sd[pre + "mlp.c_fc.bias"])
        x = x + (h @ sd[pre + "mlp.c_proj.weight"].T + sd[pre + "mlp.c_proj.bias"])
        Zs.append(x)
        As.append(A)
    feats = ln(x, "visual.ln_post")[:, 0] @ sd["visual.proj"]  # CLS pooling ('tok')
    return feats, Zs, As


def oracle_legrad(
    sd: dict, cfg: dict, images: torch.Tensor, text: torch.Tensor, layer_index=LAYER_INDEX
):
    """LeGrad as described in the research notes, CLIP head of the reference.

    Returns (maps (B,P,g*p,g*p), grid_maps_per_layer (B,P,L',g,g), grid_maps (B,P,g,g)).
    """
    v = cfg["vision_cfg"]
    p, D, L = v["patch_size"], v["width"], v["layers"]
    layers = list(range(L + layer_index if layer_index < 0 else layer_index, L))
    # The input is made a leaf that requires grad so that A^l and Z^l sit on a graph
    # (the parameters are used as plain tensors; dS/dA does not depend on that).
    images = images.detach().clone().requires_grad_(True)
    sd = {k: t.detach() for k, t in sd.items()}
    with torch.enable_grad():
        _, Zs, As = oracle_forward(sd, cfg, images)
        B, P = images.shape[0], text.shape[0]
        g = math.isqrt(Zs[0].shape[1] - 1)
        per_layer = torch.zeros(B, P, len(layers), g, g)
        for li, layer in enumerate(layers):
            pooled = Zs[layer].mean(dim=1)  # mean over ALL N tokens (CLS included)
            emb = F.normalize(
                F.layer_norm(pooled, (D,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
                @ sd["visual.proj"],
                dim=-1,
            )  # (B, E)
            sims = emb @ text.T  # (B, P): cosine, text rows are unit-norm
            for pi in range(P):
                # Samples are independent, so the gradient of the batch sum gives every
                # image's own dS_b/dA_b.
                G = torch.autograd.grad(sims[:, pi].sum(), As[layer], retain_graph=True)[
                    0
                ]  # (B, H, N, N)
                E = G.clamp(min=0).mean(dim=(1, 2))  # heads and query rows -> (B, N)
                per_layer[:, pi, li] = E[:, 1:].reshape(B, g, g).detach()
    up = F.interpolate(
        per_layer.reshape(B, P * len(layers), g, g),
        size=(g * p, g * p),
        mode="bilinear",
        align_corners=False,
    ).reshape(B, P, len(layers), g * p, g * p)
    acc = up.sum(dim=2)

    def minmax(t):
        flat = t.flatten(2)
        lo, hi = flat.min(-1, keepdim=True)[0], flat.max(-1, keepdim=True)[0]
        return ((flat - lo) / (hi - lo)).reshape(t.shape)

    return minmax(acc), per_layer, minmax(per_layer.sum(dim=2))


# --------------------------------------------------------------------------------------
def _versions():
    import importlib.metadata as md

    out = {}
    for name in ("torch", "open_clip_torch", "legrad-torch", "timm", "safetensors", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def build_model(cfg: dict):
    import open_clip

    model = open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=dict(cfg["vision_cfg"]),
        text_cfg=dict(cfg["text_cfg"]),
        quick_gelu=cfg["quick_gelu"],
    )
    return model.eval()


def perturb_(model: torch.nn.Module, gen: torch.Generator):
    """Make the random init less trivial: LayerNorm affine != (1, 0), non-zero biases,
    sharper attention. All deterministic through ``gen``."""
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith(".weight") and ("ln_" in name or "ln_final" in name):
                prm.add_(0.2 * torch.randn(prm.shape, generator=gen))
            elif name.endswith("bias"):
                prm.add_(0.1 * torch.randn(prm.shape, generator=gen))
            elif name.endswith("attn.in_proj_weight"):
                D = prm.shape[1]
                prm[: 2 * D].mul_(2.0)  # q and k: sharper, less uniform softmax
        model.visual.class_embedding.mul_(
            5.0
        )  # open_clip init is scale*randn (~0.14): make CLS distinct
        model.visual.positional_embedding.mul_(5.0)


def generate(out: Path, seed: int):
    import open_clip
    from legrad import LeWrapper
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    gen = torch.Generator().manual_seed(seed + 1)
    model = build_model(CONFIG)
    perturb_(model, gen)
    model.eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    images = torch.randn(N_IMAGES, 3, 32, 32, generator=gen)
    text = F.normalize(torch.randn(N_PROMPTS, CONFIG["embed_dim"], generator=gen), dim=-1)
    with torch.no_grad():
        image_features = model.encode_image(images)

    # ---------------- reference -------------------------------------------------------
    ref_model = copy.deepcopy(model)
    pos_before = ref_model.visual.positional_embedding.detach().clone()
    wrapper = LeWrapper(ref_model, layer_index=LAYER_INDEX)
    maps, pos_after_first = [], None
    for i in range(N_IMAGES):
        m = wrapper.compute_legrad(text_embedding=text, image=images[i : i + 1])  # (1, P, H, W)
        maps.append(m.detach()[0])
        if pos_after_first is None:
            pos_after_first = ref_model.visual.positional_embedding.detach().clone()
    maps = torch.stack(maps).contiguous()  # (n_images, P, H, W)
    pos_after = ref_model.visual.positional_embedding.detach().clone()

    assert torch.isfinite(maps).all(), "reference maps contain NaN/inf"
    per_map_std = maps.flatten(2).std(-1)
    assert (per_map_std > 1e-3).all(), f"a reference map is (nearly) constant: {per_map_std}"

    # ---------------- oracle ------------------------------------------------------------
    o_maps, o_layers, o_grid = oracle_legrad(state, CONFIG, images, text)
    o_feats, _, _ = oracle_forward(state, CONFIG, images)
    diff = (o_maps - maps).abs().max().item()
    feat_diff = (o_feats.detach() - image_features).abs().max().item()
    g = CONFIG["vision_cfg"]["image_size"] // CONFIG["vision_cfg"]["patch_size"]
    p = CONFIG["vision_cfg"]["patch_size"]

    # ---------------- write -------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    # (no extra metadata: safetensors writes the metadata map in random order, which would
    # make the file differ byte-wise between otherwise identical runs)
    save_file(state, str(out / "model.safetensors"))
    save_file(
        {"images": images.contiguous(), "text_embeddings": text.contiguous()},
        str(out / "inputs.safetensors"),
    )
    save_file(
        {"maps": maps, "image_features": image_features.contiguous()},
        str(out / "reference.safetensors"),
    )
    save_file(
        {
            "maps": o_maps.contiguous(),
            "grid_maps_per_layer": o_layers.contiguous(),
            "grid_maps": o_grid.contiguous(),
        },
        str(out / "oracle.safetensors"),
    )

    from dataclasses import asdict

    full_v = asdict(open_clip.model.CLIPVisionCfg(**CONFIG["vision_cfg"]))
    full_t = asdict(open_clip.model.CLIPTextCfg(**CONFIG["text_cfg"]))
    meta = {
        "description": "Golden LeGrad maps from the authors' reference implementation "
        "(legrad-torch 1.1) on a "
        "small random-init OpenCLIP CLIP ViT. Regenerate with scripts/make_golden_fixtures.py.",
        "versions": _versions(),
        "python": sys.version.split()[0],
        "seed": seed,
        "seed_note": "torch.manual_seed(seed) before open_clip.CLIP(**config); a torch.Generator "
        "seeded "
        "seed+1 for the weight perturbation, the images and the text embeddings (in that order). "
        "Bit-exact regeneration is only expected with the same torch build.",
        "config": CONFIG,
        "config_full_open_clip_2_23": {"vision_cfg": full_v, "text_cfg": full_t},
        "build_call": "model = open_clip.CLIP(embed_dim=cfg['embed_dim'], "
        "vision_cfg=cfg['vision_cfg'], "
        "text_cfg=cfg['text_cfg'], quick_gelu=cfg['quick_gelu']).eval(); "
        "model.load_state_dict(safetensors.torch.load_file('model.safetensors'))",
        "weights_note": "open_clip random init, then LayerNorm weights += 0.2*randn, every bias "
        "+= 0.1*randn, "
        "q/k rows of every in_proj_weight *2, visual class/positional embedding *5 "
        "(to make the map non-trivial). The stored state dict is the final one.",
        "reference_call": "wrapper = legrad.LeWrapper(copy.deepcopy(model), layer_index=-2); "
        "for i in range(n_images): maps[i] = wrapper.compute_legrad("
        "text_embedding=inputs['text_embeddings'], image=inputs['images'][i:i+1])[0].detach()",
        "reference_semantics": {
            "layers": list(
                range(CONFIG["vision_cfg"]["layers"] + LAYER_INDEX, CONFIG["vision_cfg"]["layers"])
            ),
            "layer_index": LAYER_INDEX,
            "score_per_layer": "cos(normalize(ln_post(mean over ALL N tokens of Z^l) @ "
            "visual.proj), t_p); "
            "text_embeddings rows are already unit-norm",
            "differentiated": "post-softmax per-head attention A^l of block l",
            "reduction": "relu(dS/dA) mean over heads then over ALL query rows; CLS key column "
            "dropped; "
            "row-major reshape to (g, g)",
            "layer_aggregation": "sum of per-layer maps, each already upsampled",
            "upsampling": f"F.interpolate(scale_factor=patch_size={p}, mode='bilinear', "
            f"align_corners=False) "
            f"per layer: output side = grid*patch = {g}*{p} = {g * p}",
            "normalisation": "min-max per (image, prompt) over H*W, no epsilon",
            "batching": "the reference merges image batches, so it was called one image at a time",
            "output_shape_per_call": [1, N_PROMPTS, g * p, g * p],
        },
        "positional_embedding": {
            "shape_before": list(pos_before.shape),
            "shape_after_first_call": list(pos_after_first.shape),
            "shape_after_all_calls": list(pos_after.shape),
            "values_unchanged": bool(
                torch.equal(pos_before, pos_after_first.reshape(pos_before.shape))
                and torch.equal(pos_before, pos_after.reshape(pos_before.shape))
            ),
            "max_abs_change": (pos_after.reshape(pos_before.shape) - pos_before).abs().max().item(),
            "note": "LeWrapper's vit_dynamic_size_forward compares x.shape[1] (N tokens) with "
            "positional_embedding.shape[1] (= width for open_clip's 2-D (N, D) embedding), so it "
            "'resamples' on the first call even at the native size. At the native size timm's "
            "resample_abs_pos_embed returns its input, so .data becomes the 3-D (1, N, D) view "
            "with "
            "identical values. The maps were therefore computed with the original values. The "
            "stored model.safetensors holds the pristine 2-D (N, D) embedding (saved before "
            "wrapping).",
        },
        "shapes": {
            "inputs.images": list(images.shape),
            "inputs.text_embeddings": list(text.shape),
            "reference.maps": list(maps.shape),
            "reference.image_features": list(image_features.shape),
            "oracle.maps": list(o_maps.shape),
            "oracle.grid_maps_per_layer": list(o_layers.shape),
            "oracle.grid_maps": list(o_grid.shape),
        },
        "dtypes": "all float32",
        "checks": {
            "oracle_vs_reference_maps_max_abs_diff": diff,
            "oracle_forward_vs_encode_image_max_abs_diff": feat_diff,
            "reference_maps_min": maps.min().item(),
            "reference_maps_max": maps.max().item(),
            "reference_maps_per_map_std_min": per_map_std.min().item(),
            "reference_maps_all_finite": bool(torch.isfinite(maps).all()),
        },
        "oracle_note": "oracle.safetensors is NOT produced by legrad: it is the functional "
        "re-implementation in "
        "make_golden_fixtures.py (oracle_forward / oracle_legrad). grid_maps_per_layer are the raw "
        "per-layer maps (after ReLU/mean/drop-CLS, before any upsampling or normalisation); layer "
        "order = reference_semantics.layers. grid_maps = min-max(sum over layers) at patch "
        "resolution (what a re-implementation without upsampling should give). NB: the reference "
        "min-maxes "
        "AFTER the bilinear upsampling, so upsample(grid_maps) != maps (bilinear x8 with "
        "align_corners=False never hits the grid maxima/minima exactly); compare like with like.",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for f in out.iterdir():
        if f.name.endswith((".safetensors", ".json")):
            f.chmod(0o644)  # safetensors creates files 0600

    print(f"wrote fixtures to {out}")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:24s} {f.stat().st_size:8d} bytes")
    print(
        f"reference maps: shape={tuple(maps.shape)} range=[{maps.min():.4f}, {maps.max():.4f}] "
        f"min per-map std={per_map_std.min():.4f}"
    )
    print(
        f"positional_embedding: {tuple(pos_before.shape)} -> {tuple(pos_after.shape)}, "
        f"values unchanged: {meta['positional_embedding']['values_unchanged']}"
    )
    print(f"oracle forward vs encode_image: max abs diff = {feat_diff:.3e}")
    print(f"ORACLE vs REFERENCE maps: max abs diff = {diff:.3e}")
    if diff > 1e-5:
        print("WARNING: oracle and reference disagree", file=sys.stderr)
        return 1
    return 0


def check(folder: Path):
    """Load the fixtures with whatever open_clip is installed (no legrad) and verify them."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    inputs = load_file(str(folder / "inputs.safetensors"))
    ref = load_file(str(folder / "reference.safetensors"))
    orc = load_file(str(folder / "oracle.safetensors"))
    print(f"open_clip {_versions()['open_clip_torch']}, torch {torch.__version__}")

    model = build_model(cfg)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape_mismatch = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    print(
        f"state-dict keys: model {len(own)}, file {len(sd)}; missing={missing} "
        f"unexpected={unexpected} shape_mismatch={shape_mismatch}"
    )
    model.load_state_dict(sd, strict=True)
    print("load_state_dict(strict=True): OK")
    bufs = {n: tuple(b.shape) for n, b in model.named_buffers()}
    print(f"buffers (not in the file unless persistent): {bufs}")
    batch_first = getattr(model.visual.transformer, "batch_first", "n/a (LND)")
    print(f"visual.transformer batch_first: {batch_first}")

    with torch.no_grad():
        feats = model.encode_image(inputs["images"])
    fdiff = (feats - ref["image_features"]).abs().max().item()
    print(f"encode_image vs stored 2.23 image_features: max abs diff = {fdiff:.3e}")
    o_maps, o_layers, _ = oracle_legrad(sd, cfg, inputs["images"], inputs["text_embeddings"])
    d_ref = (o_maps - ref["maps"]).abs().max().item()
    d_orc = (o_maps - orc["maps"]).abs().max().item()
    d_lay = (o_layers - orc["grid_maps_per_layer"]).abs().max().item()
    print(f"oracle recomputed vs reference maps: max abs diff = {d_ref:.3e}")
    print(
        f"oracle recomputed vs stored oracle maps / per-layer grid maps: {d_orc:.3e} / {d_lay:.3e}"
    )
    ok = fdiff < 1e-5 and d_ref < 1e-5 and d_lay < 1e-5
    print("CHECK", "OK" if ok else "FAILED")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------
# Larger input sizes (--scale): CLIP, CoCa and SigLIP
# --------------------------------------------------------------------------------------
COCA_CONFIG = {
    "embed_dim": 32,
    "multimodal_cfg": {
        "width": 32,
        "context_length": 16,
        "heads": 2,
        "layers": 1,
        "vocab_size": 100,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    "vision_cfg": {
        "layers": 3,
        "width": 40,
        "head_width": 8,
        "patch_size": 8,
        "image_size": 32,
        "attentional_pool": True,
        "attn_pooler_queries": 4,
        "attn_pooler_heads": 2,
        "output_tokens": True,
    },
}

#: open_clip ``TimmModel(model_name, embed_dim, image_size, pool, proj)``, its trunk built by
#: ``timm.create_model(model_name, **trunk_kwargs, num_classes=0, global_pool=pool)``.
SIGLIP_CONFIG = {
    "model_name": "vit_base_patch16_siglip_224",
    "embed_dim": 32,
    "image_size": 32,
    "pool": "map",
    "proj": "none",
    "trunk_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2},
}


def build_coca(cfg: dict):
    import open_clip

    return open_clip.CoCa(
        embed_dim=cfg["embed_dim"],
        multimodal_cfg=dict(cfg["multimodal_cfg"]),
        text_cfg=dict(cfg["text_cfg"]),
        vision_cfg=dict(cfg["vision_cfg"]),
    ).eval()


def build_siglip_tower(cfg: dict):
    """open_clip's TimmModel around a tiny timm SigLIP (MAP head) trunk."""
    import functools

    import open_clip.timm_model as tm

    create = tm.timm.create_model
    tm.timm.create_model = functools.partial(create, **cfg["trunk_kwargs"])
    try:
        return tm.TimmModel(
            cfg["model_name"],
            embed_dim=cfg["embed_dim"],
            image_size=cfg["image_size"],
            pool=cfg["pool"],
            proj=cfg["proj"],
        ).eval()
    finally:
        tm.timm.create_model = create


class _SiglipModel(torch.nn.Module):
    """What LeWrapper needs of a SigLIP model: ``.visual`` and ``encode_image``."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.logit_scale = torch.nn.Parameter(torch.zeros(()))

    def encode_image(self, image, normalize: bool = False):
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features


def generate_scaled(out: Path, seed: int, scale: int):
    from legrad import LeWrapper
    from safetensors.torch import save_file

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    side = 32 * scale
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "description": f"Golden LeGrad maps from legrad-torch 1.1 at {side}x{side} on models "
        "trained at 32x32 (the reference resamples the position embedding: timm "
        "resample_abs_pos_embed, bicubic, antialias; CLIP and CoCa in LeWrapper's "
        "vit_dynamic_size_forward, SigLIP by switching the timm trunk to dynamic_img_size). "
        "Regenerate with scripts/make_golden_fixtures.py --scale.",
        "versions": _versions(),
        "python": sys.version.split()[0],
        "seed": seed,
        "scale": scale,
        "image_size": [side, side],
        "layer_index": LAYER_INDEX,
        "models": {},
    }

    def make_clip():
        torch.manual_seed(seed)
        model = build_model(CONFIG)
        perturb_(model, torch.Generator().manual_seed(seed + 1))  # the 1x fixture's weights
        return model.eval(), {"kind": "clip", "config": CONFIG}

    def make_coca():
        torch.manual_seed(seed)
        model = build_coca(COCA_CONFIG)
        perturb_(model, torch.Generator().manual_seed(seed + 2))
        return model.eval(), {"kind": "coca", "config": COCA_CONFIG}

    def make_siglip():
        torch.manual_seed(seed)
        tower = build_siglip_tower(SIGLIP_CONFIG)
        gen = torch.Generator().manual_seed(seed + 3)
        with torch.no_grad():
            for name, prm in tower.named_parameters():
                if name.endswith("bias") or (name.endswith(".weight") and "norm" in name):
                    prm.add_(0.1 * torch.randn(prm.shape, generator=gen))
            tower.trunk.pos_embed.mul_(20.0)  # timm's init (std 0.02) is nearly flat
        return _SiglipModel(tower).eval(), {"kind": "siglip", "config": SIGLIP_CONFIG}

    status = 0
    for name, make in (("clip", make_clip), ("coca", make_coca), ("siglip", make_siglip)):
        model, info = make()
        state = {k: v.detach().clone().contiguous() for k, v in model.visual.state_dict().items()}
        gen = torch.Generator().manual_seed(seed + 10)
        images = torch.randn(N_IMAGES, 3, side, side, generator=gen)
        text = F.normalize(torch.randn(N_PROMPTS, 32, generator=gen), dim=-1)
        ref_model = copy.deepcopy(model)
        entry = {**info, "status": "ok"}
        try:
            wrapper = LeWrapper(ref_model, layer_index=LAYER_INDEX)
            maps = torch.zeros(N_IMAGES, N_PROMPTS, side, side)
            for i in range(N_IMAGES):
                for k in range(N_PROMPTS):
                    kwargs = {"apply_correction": False} if name == "siglip" else {}
                    m = wrapper.compute_legrad(
                        text_embedding=text[k : k + 1], image=images[i : i + 1], **kwargs
                    )
                    maps[i, k] = m.detach().reshape(side, side)
        except Exception as error:  # the reference does not support this model at this size
            entry.update(status="unsupported", error=f"{type(error).__name__}: {error}")
            print(f"{name}: the reference raised {type(error).__name__}: {error}", file=sys.stderr)
            meta["models"][name] = entry
            status = 1
            continue
        finite = bool(torch.isfinite(maps).all())
        std = maps.flatten(2).std(-1).min().item()
        entry.update(
            maps_all_finite=finite,
            maps_min_per_map_std=std,
            reference_call=(
                "wrapper = legrad.LeWrapper(copy.deepcopy(model), layer_index=-2); "
                "maps[i, k] = wrapper.compute_legrad(text_embedding=T[k:k+1], "
                "image=images[i:i+1]"
                + (", apply_correction=False" if name == "siglip" else "")
                + ")"
            ),
            weights_note={
                "clip": "the 1x fixture's model (same seed and perturbation)",
                "coca": "open_clip random init (torch.manual_seed(seed)), perturbed as perturb_ "
                "with a generator seeded seed+2",
                "siglip": "random init (torch.manual_seed(seed)); biases and norm weights "
                "+= 0.1*randn (generator seed+3); trunk.pos_embed *= 20",
            }[name],
            positional_embedding_after=list(
                (
                    ref_model.visual.trunk.pos_embed
                    if name == "siglip"
                    else ref_model.visual.positional_embedding
                ).shape
            ),
        )
        assert finite, f"{name}: reference maps contain NaN/inf"
        save_file(state, str(out / f"{name}.safetensors"))
        save_file(
            {"images": images.contiguous(), "text_embeddings": text.contiguous()},
            str(out / f"{name}_inputs.safetensors"),
        )
        save_file({"maps": maps.contiguous()}, str(out / f"{name}_reference.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
        meta["models"][name] = entry
        print(
            f"{name}: maps {tuple(maps.shape)} range [{maps.min():.4f}, {maps.max():.4f}], "
            f"min per-map std {std:.4f}, embedding now {entry['positional_embedding_after']}"
        )
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)
    return status


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    grp = ap.add_mutually_exclusive_group(required=True)
    grp.add_argument(
        "--out", type=Path, help="generate fixtures into this folder (needs legrad-torch 1.1)"
    )
    grp.add_argument(
        "--check", type=Path, help="verify fixtures in this folder with the installed open_clip"
    )
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument(
        "--scale",
        type=int,
        default=1,
        help="with --out: images of scale x the native 32x32 (CLIP, CoCa, SigLIP); 1 = the "
        "original fixtures",
    )
    args = ap.parse_args(argv)
    if args.out is not None:
        if args.scale != 1:
            return generate_scaled(args.out, args.seed, args.scale)
        return generate(args.out, args.seed)
    return check(args.check)


if __name__ == "__main__":
    sys.exit(main())
