"""What an older library release (the oldest ``pyproject.toml`` allows, run by
``scripts/check_oldest.sh``) lacks is refused with what to do, and the skip helpers of
``tests/_versions.py`` name the release that added it."""

from __future__ import annotations

import pytest
import torch
from _versions import has, hf_since, reason, require_timm_model

from captum_legrad import UnsupportedModelError, discover


def test_reason_names_installed_and_adding_release() -> None:
    text = reason("timm", "model qwen3_vit_88m", "timm 1.0.30")
    assert text.startswith("timm ") and text.endswith("(added in timm 1.0.30)")
    assert has("torch", "nn.Module") and not has("torch", "no_such_thing")
    assert not has("no_such_module_here")
    assert hf_since("Siglip2VisionModel") == "transformers 4.50"
    assert hf_since("DINOv3ViTModel") == "transformers 4.56"


def test_unknown_timm_model_skips_with_the_release() -> None:
    pytest.importorskip("timm")
    require_timm_model("vit_tiny_patch16_224")  # every release has it: no skip
    with pytest.raises(pytest.skip.Exception, match=r"added in timm 1\.0\.30"):
        require_timm_model("qwen3_vit_88m_no_such_variant")


def test_old_llava_layout_is_refused_with_what_to_do() -> None:
    tf = pytest.importorskip("transformers")
    if hasattr(tf, "LlavaModel"):
        pytest.skip(f"transformers {tf.__version__} has the base-model layout (4.52+)")
    from captum_legrad import AnswerLogits

    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )  # fmt: skip
    text = tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=64, max_position_embeddings=128,
    )  # fmt: skip
    model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision, text, image_token_index=63))
    ids = torch.tensor([[1, *[63] * 16, 5]])
    with pytest.raises(UnsupportedModelError, match=r"transformers >= 4\.52") as info:
        AnswerLogits(model.eval(), ids, torch.tensor([[7]]))
    assert "upgrade transformers" in str(info.value)
    # its vision tower alone is an ordinary CLIP vision model
    assert discover(model.vision_tower).family == "hf"
