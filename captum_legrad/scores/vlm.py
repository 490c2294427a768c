"""Vision-language models: explain which image regions made the model say each answer token.

:class:`AnswerLogits` wraps a VLM with a fixed prompt and a teacher-forced answer as an
image classifier whose "classes" are the answer's tokens: ``forward(pixel_values)``
returns the ``(B, T)`` logits of the answer tokens, and it describes itself to LeGrad
(``legrad_spec``): the language model's decoder layers are the blocks, the image tokens
are the patches, and a layer's hidden state read through the final norm and ``lm_head``
(the logit lens) is the per-layer readout (``docs/method.md``, "Vision-language models").
:func:`explain_answer` goes from a processor, an image and a question to the answer's
tokens and one map each.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import CaptureError
from ..spec import MapForms, PatchLayout, ViTSpec
from ..views import SampleViews, source_maps, token_layout, view_maps

if TYPE_CHECKING:
    from ..adapters.hf.vlm import VLMParts

__all__ = ["AnswerLogits", "AnswerExplanation", "explain_answer"]

_REDUCES = (None, "sum")


@dataclass(frozen=True)
class _Plan:
    """One forward's teacher-forced sequence, left-padded, and where to read it."""

    input_ids: Tensor  # (B, S + T): prompt then answer, padding moved to the left
    attention_mask: Tensor  # (B, S + T)
    token_type_ids: Optional[Tensor]  # (B, S + T)
    positions: Tensor  # (B, T): the position predicting answer token j (S + j - 1)
    answer_ids: Tensor  # (B, T)
    answer_mask: Tensor  # (B, T) bool: the answer tokens that count in reduce="sum"
    image_keys: Optional[Tensor]  # (B, g_h·g_w): key positions of the image patches, row-major
    views: Optional[List[SampleViews]] = None  # families described by views: per sample
    layout: Optional[PatchLayout] = None  # their token layout (every view's tokens)
    inputs: Dict[str, Any] = field(default_factory=dict)  # the other model inputs


def _as_ids(value: Any, name: str) -> Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(
            f"{name} must be integer token ids of shape (B, length) or (length,), got "
            f"{tuple(tensor.shape)} {tensor.dtype}."
        )
    return tensor.long()


def _repeat_rows(tensor: Tensor, batch: int, name: str) -> Tensor:
    """``tensor`` (b, …) for ``batch`` images: the same rows, or each row repeated
    ``batch / b`` times in a row (a single prompt for many images; NoiseTunnel's copies)."""
    if tensor.shape[0] == batch:
        return tensor
    rows = tensor.shape[0]
    if rows == 0 or batch % rows:
        raise ValueError(
            f"AnswerLogits got {batch} images but {rows} rows of {name}: give one row per "
            "image, or one row for all images. With internal_batch_size (which splits the "
            "images), pass the prompts as additional_forward_args=(input_ids, answer_ids, "
            "attention_mask) so that they are split with the images."
        )
    return tensor.repeat_interleave(batch // rows, dim=0)


def _plain_linear(head: nn.Module, device: torch.device) -> bool:
    """Whether ``head`` is an ``nn.Linear`` whose weight can be read directly on ``device``:
    not wrapped by accelerate's hooks (``device_map``: offloaded weights live on the meta
    device until the module's own forward loads them)."""
    return (
        type(head) is nn.Linear
        and getattr(head, "_hf_hook", None) is None
        and head.weight.device == device
    )


class AnswerLogits(nn.Module):
    r"""The logits of a teacher-forced answer of a vision-language model, as an explainable model.

    The prompt ``input_ids`` (holding the model's image placeholder tokens) is followed by
    ``answer_ids``; ``forward(pixel_values)`` returns, for every answer token ``j``, the
    logit of ``answer_ids[:, j]`` at the position that predicts it (the position before
    it): ``(B, T)``, or ``(B, 1)`` with ``reduce="sum"`` (the summed logits: the whole
    answer). So ``LeGrad(AnswerLogits(vlm, input_ids, answer_ids))`` explains answer token
    ``j`` as ``target=j``, and ``attribute_multi(pixel_values, targets=range(T))`` gives
    one map per answer token from one forward.

    For LeGrad the language model's decoder layers are the blocks, its attention is
    differentiated at the image tokens' key positions (laid out on the image-token grid),
    and layer ``l``'s per-token score is the logit lens: its hidden state through the
    final norm and ``lm_head`` (``docs/method.md``). Padding may be on either side: each
    sample's answer is placed right after its prompt (padding moved to the left), so
    sample ``i`` of a batch is explained as if alone. Supported models:
    ``LlavaForConditionalGeneration`` (LLaVA-1.5), ``PaliGemmaForConditionalGeneration``
    and ``Gemma3ForConditionalGeneration`` (one image per sample on one grid), and
    ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and
    ``Qwen3VLForConditionalGeneration`` (any image size, several images and videos per
    sample, described through views: :mod:`captum_legrad.views`), the tiled families
    ``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``
    (a base view and the unpadded crops per image), ``Idefics3ForConditionalGeneration``,
    ``SmolVLMForConditionalGeneration`` (tiles and the global image),
    ``Mistral3ForConditionalGeneration`` (views too), and
    ``InternVLForConditionalGeneration``, ``Gemma4ForConditionalGeneration`` and
    ``Llama4ForConditionalGeneration`` (tiles, thumbnail or global view; InternVL and
    Llama 4 also take ``image_sizes``, each image's original ``(H, W)``, which their
    processors do not return), and ``MllamaForConditionalGeneration`` (Llama 3.2 Vision:
    the blocks are its cross-attention decoder layers and the keys its vision tokens, each
    image one view over its tile canvas; it takes ``aspect_ratio_ids``,
    ``aspect_ratio_mask``, ``cross_attention_mask`` and ``image_sizes``), with ``sdpa`` or
    ``eager`` attention (``docs/models.md``).

    The processor's other outputs are passed by their HF names (``**model_inputs``), for
    the prompt only, as the processor returns them; per-token ones (``mm_token_type_ids``)
    are extended over the answer. ``pixel_values`` (the explained input) goes to
    ``forward`` in the processor's shape: for Qwen-VL the flattened patches of every
    image, whose dim 0 is not the batch (the batch is ``input_ids``' rows). With one image
    (or video) per sample, LeGrad's ``output="grid"`` is its token grid and ``"map"`` its
    canvas (Qwen-VL: the resized image; LLaVA-NeXT: the original image, the base view and
    the crops averaged); with several sources or views, use :meth:`source_maps` or
    :meth:`view_maps`.

    Args:
        model (nn.Module): The vision-language model (``…ForConditionalGeneration``), in
                    eval mode. It is not changed.
        input_ids (Tensor): ``(B, S)`` or ``(S,)`` prompt token ids, with the image
                    placeholder tokens as the model's processor inserts them (one image
                    per sample). One row serves every image of a batch.
        answer_ids (Tensor): ``(B, T)`` or ``(T,)`` answer token ids, teacher-forced
                    after the prompt.
        attention_mask (Tensor, optional): ``(B, S)`` prompt mask, 1 for tokens and 0 for
                    padding (left or right).
                    Default: None (no padding)
        token_type_ids (Tensor, optional): ``(B, S)`` prompt token types for models whose
                    attention reads them (PaliGemma's bidirectional prefix, Gemma 3's
                    bidirectional image tokens). None builds them as the model's
                    processor does; answer tokens get the model's answer type.
                    Default: None
        answer_mask (Tensor, optional): ``(B, T)``, 0 for padding at the end of shorter
                    answers; such tokens are left out of ``reduce="sum"``.
                    Default: None (every answer token counts)
        reduce (str, optional): None for the ``(B, T)`` per-token logits; ``"sum"`` for
                    their sum ``(B, 1)``, whose LeGrad map is the whole answer's map (the
                    sum of the per-token maps before normalisation).
                    Default: None
        **model_inputs (Any): The processor's other outputs by their names
                    (``image_grid_thw``, ``video_grid_thw``, ``mm_token_type_ids``,
                    ``pixel_values_videos``, ``second_per_grid_ts``, ...). Families on one
                    grid take none.

    Examples::

        >>> from captum_legrad import LeGrad, AnswerLogits
        >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
        >>> answer = vlm.generate(**inputs, max_new_tokens=8)[:, inputs.input_ids.shape[1]:]
        >>> explained = AnswerLogits(vlm, inputs.input_ids, answer, inputs.attention_mask)
        >>> maps = LeGrad(explained).attribute_multi(
        ...     inputs.pixel_values, targets=range(answer.shape[1]))  # (1, T, H, W)
        >>> # Qwen-VL: every output of the processor by its name
        >>> inputs = processor(images=[image], text=[chat], return_tensors="pt")
        >>> explained = AnswerLogits(qwen, inputs.input_ids, answer, inputs.attention_mask,
        ...                          image_grid_thw=inputs.image_grid_thw,
        ...                          mm_token_type_ids=inputs.mm_token_type_ids)
        >>> grid = LeGrad(explained).attribute_multi(inputs.pixel_values, targets=range(T),
        ...                                          output="grid", normalize=False)
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: Tensor,
        answer_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        *,
        token_type_ids: Optional[Tensor] = None,
        answer_mask: Optional[Tensor] = None,
        reduce: Optional[str] = None,
        **model_inputs: Any,
    ) -> None:
        super().__init__()
        if reduce not in _REDUCES:
            raise ValueError(f"reduce must be None or 'sum', got {reduce!r}.")
        from ..adapters.hf.vlm import describe  # adapters load when a model needs them

        self.parts: VLMParts = describe(model)
        self.model = model
        self.reduce = reduce
        prompt = _as_ids(input_ids, "input_ids")
        answer = _as_ids(answer_ids, "answer_ids")
        if answer.shape[1] == 0:
            raise ValueError("answer_ids is empty: give at least one answer token.")
        self.register_buffer("input_ids", prompt, persistent=False)
        self.register_buffer("answer_ids", answer, persistent=False)
        for name, value, like in (
            ("attention_mask", attention_mask, prompt),
            ("token_type_ids", token_type_ids, prompt),
            ("answer_mask", answer_mask, answer),
        ):
            if value is not None:
                value = torch.as_tensor(value)
                if name != "token_type_ids":
                    value = (value != 0).long()  # masks may be bool, int or float
                value = _as_ids(value, name)
                if value.shape != like.shape:
                    raise ValueError(
                        f"{name} has shape {tuple(value.shape)} but must match "
                        f"{'input_ids' if like is prompt else 'answer_ids'} "
                        f"{tuple(like.shape)}."
                    )
            self.register_buffer(name, value, persistent=False)
        if prompt.shape[0] != answer.shape[0] and 1 not in (prompt.shape[0], answer.shape[0]):
            raise ValueError(
                f"input_ids has {prompt.shape[0]} rows and answer_ids {answer.shape[0]}: give "
                "one answer per prompt (or one row of either for all)."
            )
        self.model_inputs: Dict[str, Any] = self._check_inputs(model_inputs, prompt)
        self._local = threading.local()

    def _check_inputs(self, model_inputs: Mapping[str, Any], prompt: Tensor) -> Dict[str, Any]:
        """The processor's other outputs, by their HF names, checked against the family."""
        rules = self.parts.views
        given = {k: v for k, v in model_inputs.items() if v is not None}
        if rules is None:
            if given:
                raise ValueError(
                    f"{self.parts.family} takes no model inputs besides input_ids, "
                    f"attention_mask and token_type_ids (and the pixel_values LeGrad explains); "
                    f"got {sorted(given)}."
                )
            return {}
        main = rules.main_input(given)
        if main in given:
            raise ValueError(
                f"{main} is the input LeGrad explains: pass it to LeGrad's attribute / "
                "attribute_multi (or to this module's forward), not to AnswerLogits."
            )
        for name in rules.per_token:
            value = given.get(name)
            shape = None if value is None else tuple(torch.as_tensor(value).shape)
            if shape is not None and shape[:2] != tuple(prompt.shape):
                raise ValueError(
                    f"{name} has shape {shape} but must match input_ids "
                    f"{tuple(prompt.shape)} in its first two dimensions (the prompt, as the "
                    "processor returns it)."
                )
        return given

    def __getstate__(self) -> Dict[str, Any]:
        # The per-thread plan of the last forward is not copied (deepcopy, pickle).
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._local = threading.local()

    # ------------------------------------------------------------------ the sequence

    def _batch(self, pixel_values: Tensor, input_ids: Optional[Tensor]) -> int:
        """The samples of a forward: ``pixel_values``' dim 0, or the prompts' rows for
        families whose pixels are not batch-first (Qwen-VL's flattened patches)."""
        rules = self.parts.views
        if rules is None or rules.batch_first:
            return int(pixel_values.shape[0])
        prompt = input_ids if input_ids is not None else self.get_buffer("input_ids")
        return int(_as_ids(prompt, "input_ids").shape[0])

    def _plan(
        self,
        pixel_values: Tensor,
        input_ids: Optional[Tensor],
        answer_ids: Optional[Tensor],
        attention_mask: Optional[Tensor],
        token_type_ids: Optional[Tensor],
        answer_mask: Optional[Tensor],
    ) -> _Plan:
        parts = self.parts
        device = pixel_values.device
        batch = self._batch(pixel_values, input_ids)
        given = input_ids is not None
        prompt = _as_ids(input_ids if given else self.get_buffer("input_ids"), "input_ids")
        answer = _as_ids(
            answer_ids if answer_ids is not None else self.get_buffer("answer_ids"), "answer_ids"
        )
        if not given:
            attention_mask = self._optional("attention_mask")
            token_type_ids = self._optional("token_type_ids")
        if answer_ids is None:
            answer_mask = self._optional("answer_mask")
        prompt = _repeat_rows(prompt, batch, "input_ids")
        answer = _repeat_rows(answer, batch, "answer_ids")
        prompt, answer = prompt.to(device), answer.to(device)
        s, t = prompt.shape[1], answer.shape[1]
        mask = (
            torch.ones_like(prompt)
            if attention_mask is None
            else _repeat_rows(attention_mask.to(device).long(), batch, "attention_mask")
        )
        types = None
        if parts.answer_type_id is not None:
            if token_type_ids is None:
                assert parts.prompt_type_ids is not None
                types = parts.prompt_type_ids(prompt)
            else:
                types = _repeat_rows(token_type_ids.to(device).long(), batch, "token_type_ids")
        # Move each row's padding to the left (a stable sort keeps the tokens' order), so
        # every answer starts right after its own prompt at position S.
        order = torch.sort((mask != 0).long(), dim=1, stable=True).indices
        unsorted = prompt
        prompt, mask = prompt.gather(1, order), mask.gather(1, order)
        ids = torch.cat([prompt, answer], dim=1)
        full_mask = torch.cat([(mask != 0).long(), torch.ones_like(answer)], dim=1)
        if types is not None:
            answer_types = torch.full_like(answer, int(parts.answer_type_id or 0))
            types = torch.cat([types.gather(1, order), answer_types], dim=1)
        if answer_mask is None:
            kept = torch.ones_like(answer, dtype=torch.bool)
        else:
            kept = _repeat_rows(answer_mask.to(device), batch, "answer_mask") != 0
        if s == 0 or bool((mask.sum(dim=1) == 0).any()):
            raise ValueError("Every prompt needs at least one token (the image tokens).")
        predicting = torch.arange(s - 1, s + t - 1, device=device).expand(batch, t)
        if parts.views is not None:
            inputs = self._sequence_inputs(unsorted, order, answer, given)
            name = parts.views.main_input(inputs)
            views = parts.views.describe(prompt, mask, {**inputs, name: pixel_values})
            layout = token_layout(views)
            return _Plan(
                ids, full_mask, types, predicting, answer, kept, None, views, layout, inputs
            )
        counts = (prompt == parts.image_token_id).sum(dim=1)
        if bool((counts != parts.tokens_per_image).any()) or bool(
            ((prompt == parts.image_token_id) & (mask == 0)).any()
        ):
            raise ValueError(
                f"Every prompt must hold exactly one image: {parts.tokens_per_image} image "
                f"tokens (id {parts.image_token_id}) of {parts.family}, got "
                f"{counts.tolist()}. Build input_ids with the model's processor (one image "
                "per prompt)."
            )
        g_h, g_w = parts.grid(pixel_values.shape[-2], pixel_values.shape[-1])
        if g_h * g_w + parts.skip_tokens != parts.tokens_per_image:
            raise ValueError(
                f"The images are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} pixels, a "
                f"{g_h}x{g_w} token grid, but {parts.family} has {parts.tokens_per_image} "
                "image tokens per image: resize the images to the model's resolution (its "
                "image processor does)."
            )
        positions = torch.nonzero(prompt == parts.image_token_id)[:, 1].view(batch, -1)
        keys = positions[:, parts.skip_tokens :]
        return _Plan(ids, full_mask, types, predicting, answer, kept, keys)

    def _sequence_inputs(
        self, prompt: Tensor, order: Tensor, answer: Tensor, given: bool
    ) -> Dict[str, Any]:
        """The other model inputs for the whole sequence: per-token ones reordered with the
        prompt's padding and extended over the answer; the rest as given."""
        rules = self.parts.views
        assert rules is not None
        inputs = dict(self.model_inputs)
        built = rules.build(prompt) if rules.build is not None else {}
        for name, fill in rules.per_token.items():
            value = inputs.get(name)
            if value is None or given:  # prompts given to forward: built for them
                value = built.get(name)
                if value is None:
                    raise ValueError(f"{self.parts.family} needs {name}: pass the processor's.")
            value = _repeat_rows(torch.as_tensor(value).to(prompt.device), prompt.shape[0], name)
            index = order.view(*order.shape, *([1] * (value.dim() - 2))).expand_as(value)
            value = value.gather(1, index)
            if fill is None:  # the last prompt row, repeated over the answer (generate's way)
                after = value[:, -1:].expand(-1, answer.shape[1], *value.shape[2:])
            else:
                after = torch.full_like(answer, fill).to(value.dtype)
            inputs[name] = torch.cat([value, after], 1)
        return inputs

    def _optional(self, name: str) -> Optional[Tensor]:
        value = getattr(self, name)
        return value if isinstance(value, Tensor) else None

    def _current(self) -> _Plan:
        plan = getattr(self._local, "plan", None)
        if plan is None:
            raise CaptureError(
                "AnswerLogits' readout ran before its forward in this thread: call the "
                "AnswerLogits module (LeGrad does), not its parts."
            )
        return plan

    # ------------------------------------------------------------------ scores

    def _logits(self, hidden: Tensor, plan: _Plan, normed: bool) -> Tensor:
        """Hidden states ``(R·B, N, D)`` → answer logits ``(R·B, T)`` (or ``(R·B, 1)``)."""
        parts = self.parts
        batch = plan.positions.shape[0]
        repeats = hidden.shape[0] // batch
        # A dispatched model (device_map) may run layer l on another device than the inputs.
        index = plan.positions.repeat(repeats, 1).to(hidden.device)  # (R·B, T)
        rows = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if not normed:
            rows = parts.norm(rows)
        answer = plan.answer_ids.repeat(repeats, 1).to(rows.device)
        head = parts.lm_head
        if isinstance(head, nn.Linear) and _plain_linear(head, rows.device):
            # lm_head(rows)[answer], computed for the answer's vocabulary rows only, in
            # float32 (half-precision models: the dot products are not rounded).
            weight = head.weight[answer]  # (R·B, T, D)
            logits = (rows.float() * weight.float()).sum(-1)
            if head.bias is not None:
                logits = logits + head.bias[answer].float()
        else:  # another head, or one accelerate dispatches (its weights may be offloaded)
            out = head(rows).to(rows.device)
            logits = out.gather(-1, answer.unsqueeze(-1)).squeeze(-1).float()
        if parts.softcap is not None:
            logits = torch.tanh(logits / parts.softcap) * parts.softcap
        logits = logits.to(plan.positions.device)  # every layer's scores on one device
        if self.reduce == "sum":
            kept = plan.answer_mask.repeat(repeats, 1)
            logits = logits.masked_fill(~kept, 0.0).sum(dim=1, keepdim=True)
        return logits

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Optional[Tensor] = None,
        answer_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        answer_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """The answer logits ``(B, T)`` (``(B, 1)`` with ``reduce="sum"``) for ``pixel_values``.

        ``pixel_values`` is passed to the model under its own name (Qwen-VL with only a
        video: ``pixel_values_videos``). The prompt and answer given here (e.g. through
        Captum's ``additional_forward_args``, which ``internal_batch_size`` splits with the
        images) replace those given at construction.
        """
        plan = self._plan(
            pixel_values, input_ids, answer_ids, attention_mask, token_type_ids, answer_mask
        )
        self._local.plan = plan
        return self._logits(self._hidden(pixel_values, plan), plan, normed=True)

    def _hidden(self, pixel_values: Tensor, plan: _Plan) -> Tensor:
        """The language model's last hidden states (final norm applied) of ``plan``'s
        sequence."""
        rules = self.parts.views
        consumed = () if rules is None else rules.consumed
        kwargs: dict = {"use_cache": False}
        kwargs.update((k, v) for k, v in plan.inputs.items() if k not in consumed)
        name = "pixel_values" if rules is None else rules.main_input(plan.inputs)
        kwargs[name] = pixel_values
        if plan.token_type_ids is not None:
            kwargs["token_type_ids"] = plan.token_type_ids
        with _restored(self.parts.inner, () if rules is None else rules.state):
            out = self.parts.inner(
                input_ids=plan.input_ids, attention_mask=plan.attention_mask, **kwargs
            )
        return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state

    def vocabulary_logits(self, pixel_values: Tensor) -> Tensor:
        """The logits over the whole vocabulary at each answer token's predicting position,
        ``(B, T, V)`` in float32 (soft-capped as the model caps them), from one forward
        without a graph: ``vocabulary_logits(x).log_softmax(-1)`` gives each answer token's
        probability under teacher forcing; ``forward`` is its column of the answer token.

        Args:
            pixel_values (Tensor): The images (or video), as for ``forward``.

        Returns:
            Tensor: ``(B, T, V)`` float32.
        """
        with torch.no_grad():
            plan = self._plan(pixel_values, None, None, None, None, None)
            hidden = self._hidden(pixel_values, plan)
            index = plan.positions.to(hidden.device)
            rows = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            logits = self.parts.lm_head(rows).float()
            if self.parts.softcap is not None:
                logits = torch.tanh(logits / self.parts.softcap) * self.parts.softcap
        return logits.to(plan.positions.device)

    # ------------------------------------------------------------------ LeGrad

    def _readout(self, tokens: Tensor) -> Tensor:
        return self._logits(tokens, self._current(), normed=False)

    def _layout(self, inputs: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        plan = self._current()
        rules = self.parts.views
        if rules is not None and rules.cross_keys is not None:
            # Cross-attention blocks: the keys are the vision tokens; views index them.
            name = rules.main_input(plan.inputs)
            expected = rules.cross_keys({**plan.inputs, name: inputs[0]})
            if n_keys != expected:
                raise CaptureError(
                    f"The cross-attention has {n_keys} keys but {self.parts.family}'s images "
                    f"give {expected} vision tokens: pass the processor's inputs unchanged."
                )
            assert plan.layout is not None
            return plan.layout
        if n_keys != plan.input_ids.shape[1]:
            raise CaptureError(
                f"The language model's attention has {n_keys} keys but the sequence has "
                f"{plan.input_ids.shape[1]} tokens; AnswerLogits supports models whose "
                "decoder layers attend over the whole prompt and answer."
            )
        if plan.layout is not None:
            return plan.layout
        assert plan.image_keys is not None
        image = inputs[0]
        grid = self.parts.grid(image.shape[-2], image.shape[-1])
        return PatchLayout(plan.image_keys, grid)

    def legrad_spec(self) -> ViTSpec:
        """The language model's decoder layers as blocks, the image tokens as patches, and
        the logit lens (final norm and ``lm_head`` at the predicting positions) as readout."""
        parts = self.parts
        rules = parts.views
        return ViTSpec(
            family=f"{parts.family} (answer logits)",
            root=parts.inner,
            blocks=parts.layers,
            attentions=parts.attentions,
            readout=self._readout,
            model_readout=self._readout,
            num_prefix_tokens=0,
            patch_size=parts.pixels_per_token,
            grid=parts.grid,
            layout=self._layout,
            # Every answer logit is read at one position, and everything after a decoder
            # layer's attention is per token: token j depends on A^l only through row
            # positions[j], so all tokens share one backward.
            score_rows=None if self.reduce == "sum" else self._score_rows,
            # The same positions are all the readout reads (also when it sums them): the
            # lean route keeps each layer's graph after its attention at these rows only.
            read_rows=self._score_rows,
            samples=None if rules is None or rules.batch_first else self._samples,
            map_forms=None if rules is None else MapForms(self._forms, self._to_input),
        )

    def _score_rows(self, inputs: Tuple[Any, ...]) -> Tensor:
        return self._current().positions

    @property
    def num_answer_tokens(self) -> int:
        """``T``, the answer tokens given at construction."""
        return int(self.get_buffer("answer_ids").shape[1])

    # ------------------------------------------------------------------ views

    def _samples(self, arguments: Tuple[Any, ...]) -> int:
        prompt = arguments[1] if len(arguments) > 1 else None
        return self._batch(arguments[0], prompt)

    def _plan_of(self, arguments: Tuple[Any, ...]) -> _Plan:
        """The plan of a forward on ``arguments`` (pixels, then forward's other arguments)."""
        rest = list(arguments[1:6]) + [None] * (5 - len(arguments[1:6]))
        return self._plan(arguments[0], *rest)

    def _forms(
        self,
        maps: Tensor,
        layout: PatchLayout,
        arguments: Tuple[Any, ...],
        output: str,
        mode: str,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Token maps ``(B, K, n)`` → each sample's one image (or video) as ``"grid"``
        (its view's token grid) or ``"map"`` (its canvas), padded to the batch's largest."""
        if getattr(self._local, "tokens", False):
            return maps, None
        samples = self._plan_of(arguments).views
        assert samples is not None
        shaped, masks = [], []
        for b, sample in enumerate(samples):
            if len(sample.sources) != 1 or (output == "grid" and len(sample.views) != 1):
                what = f"{len(sample.sources)} images/videos in {len(sample.views)} views"
                raise ValueError(
                    f"Sample {b} holds {what}: LeGrad's output has one map per sample. Use "
                    "AnswerLogits.source_maps (one map per image or video) or "
                    "AnswerLogits.view_maps (one per view), or explain_answer."
                )
            per_view = view_maps(maps[b], sample)
            if output == "grid":
                own, valid = per_view[0], torch.ones(per_view[0].shape[1:], dtype=torch.bool)
            else:
                own, valid = source_maps(per_view, sample, mode)[0]
            shaped.append(own)
            masks.append(valid.to(maps.device))
        if len({m.dim() for m in masks}) != 1:
            raise ValueError(
                "The batch mixes images and videos, whose maps have different ranks: explain "
                "them in separate calls, or use AnswerLogits.source_maps."
            )
        rank = masks[0].dim()
        largest = [max(int(m.shape[d]) for m in masks) for d in range(rank)]
        out = maps.new_zeros((maps.shape[0], maps.shape[1], *largest))
        valid_all = torch.zeros((maps.shape[0], 1, *largest), dtype=torch.bool, device=maps.device)
        for b, (own, valid) in enumerate(zip(shaped, masks)):
            region = tuple(slice(0, int(n)) for n in valid.shape)
            where: Tuple[Any, ...] = (b, slice(None), *region)
            out[where] = own
            where = (b, 0, *region)
            valid_all[where] = valid
        return out, valid_all

    def _to_input(self, maps: Tensor, arguments: Tuple[Any, ...], per_target: bool) -> Tensor:
        """Normalised canvas maps ``(B, K, *size)`` → the explained tensor's shape, ``K``
        after its first dimension (one target: the tensor's own shape)."""
        rules = self.parts.views
        assert rules is not None
        plan = self._plan_of(arguments)
        assert plan.views is not None
        if rules.to_input is None:
            raise ValueError(
                f'output="input" has no form for {self.parts.family}\'s pixel_values: use '
                'output="map".'
            )
        canvases = []
        for b, sample in enumerate(plan.views):
            size = sample.sources[0].size
            where: Tuple[Any, ...] = (b, slice(None), *(slice(0, n) for n in size))
            canvases.append([maps[where]])
        name = rules.main_input(plan.inputs)
        rows = rules.to_input(canvases, name, {**plan.inputs, name: arguments[0]})
        if rules.batch_first:
            return rows.transpose(0, 1) if per_target else rows[0]
        rows = rows.transpose(0, 1)  # (N, K, ...)
        return rows if per_target else rows[:, 0]

    def views(self, pixel_values: Tensor) -> List[SampleViews]:
        """Where each sample's image tokens are and what they cover
        (:class:`~captum_legrad.views.SampleViews`), for ``pixel_values`` and the prompts
        given at construction; positions index the teacher-forced sequence (padding moved
        to the left). Families without views: one view per sample over its image grid."""
        plan = self._plan(pixel_values, None, None, None, None, None)
        if plan.views is not None:
            return plan.views
        from ..views import Source, View

        assert plan.image_keys is not None
        height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
        grid = self.parts.grid(height, width)
        return [
            SampleViews(
                (Source("image", (height, width)),),
                (View(keys.cpu(), grid, 0, (0, 0, height, width)),),
            )
            for keys in plan.image_keys
        ]

    def _token_maps(
        self,
        pixel_values: Tensor,
        targets: Optional[Sequence[int]],
        layers: Optional[Sequence[int]],
        internal_batch_size: Optional[int],
    ) -> Tuple[Tensor, List[SampleViews]]:
        """Raw layer-summed maps ``(B, K, n_max)`` over every sample's view tokens."""
        from ..attribution import LeGrad

        if targets is None:
            targets = [0] if self.reduce == "sum" else list(range(self.num_answer_tokens))
        samples = self.views(pixel_values)
        legrad = LeGrad(self, layers=layers)
        if self.parts.views is None:  # one grid per sample: its cells are the tokens
            grid = legrad.attribute_multi(
                pixel_values, targets=targets, output="grid", normalize=False,
                internal_batch_size=internal_batch_size,
            )  # fmt: skip
            return grid.flatten(2), samples
        self._local.tokens = True
        try:
            tokens = legrad.attribute_multi(
                pixel_values, targets=targets, output="grid", normalize=False,
                internal_batch_size=internal_batch_size,
            )  # fmt: skip
        finally:
            self._local.tokens = False
        return tokens, samples

    def view_maps(
        self,
        pixel_values: Tensor,
        targets: Optional[Sequence[int]] = None,
        *,
        layers: Optional[Sequence[int]] = None,
        internal_batch_size: Optional[int] = None,
    ) -> List[List[Tensor]]:
        r"""Raw LeGrad maps on every view's token grid: per sample, per view ``(K, *grid)``
        (``(K, h, w)`` for an image view, ``(K, t, h, w)`` for a video view), unnormalised
        and layer-summed, in the order of :meth:`views`.

        Args:
            pixel_values (Tensor): The explained input, as for ``forward``.
            targets (Sequence[int], optional): Answer tokens to explain.
                        Default: None (every answer token; ``[0]`` with ``reduce="sum"``)
            layers (Sequence[int], optional): Decoder layers whose maps are summed.
                        Default: None (all)
            internal_batch_size (int, optional): As in ``LeGrad.attribute_multi``.
                        Default: None

        Returns:
            *list[list[Tensor]]*: ``maps[b][v]`` for view ``v`` of sample ``b``.

        Examples::

            >>> explained = AnswerLogits(vlm, inputs.input_ids, answer, inputs.attention_mask,
            ...                          image_grid_thw=inputs.image_grid_thw,
            ...                          mm_token_type_ids=inputs.mm_token_type_ids)
            >>> grids = explained.view_maps(inputs.pixel_values)  # [[(T, h, w), ...]]
        """
        tokens, samples = self._token_maps(pixel_values, targets, layers, internal_batch_size)
        return [view_maps(tokens[b], sample) for b, sample in enumerate(samples)]

    def source_maps(
        self,
        pixel_values: Tensor,
        targets: Optional[Sequence[int]] = None,
        *,
        layers: Optional[Sequence[int]] = None,
        normalize: bool = True,
        interpolate_mode: str = "bilinear",
        internal_batch_size: Optional[int] = None,
    ) -> List[List[Tensor]]:
        r"""LeGrad maps on every image and video of every sample, in its coordinates: per
        sample, per source ``(K, H, W)`` (image) or ``(K, T, H, W)`` (video), at the
        source's canvas size (:class:`~captum_legrad.views.Source`).

        Each view's map is upsampled to the rectangle (and frames) it covers; where views
        overlap, their mean. With ``normalize``, each (sample, target) is min-max normalised
        over all the sample's images and videos together (so they stay comparable: which
        image the token looked at), over the pixels some view covers.

        Args:
            pixel_values (Tensor): The explained input, as for ``forward``.
            targets (Sequence[int], optional): As in :meth:`view_maps`.
                        Default: None (every answer token)
            layers (Sequence[int], optional): Decoder layers whose maps are summed.
                        Default: None (all)
            normalize (bool, optional): Min-max normalise as above.
                        Default: True
            interpolate_mode (str, optional): Upsampling mode.
                        Default: "bilinear"
            internal_batch_size (int, optional): As in ``LeGrad.attribute_multi``.
                        Default: None

        Returns:
            *list[list[Tensor]]*: ``maps[b][i]`` for image or video ``i`` of sample ``b``.

        Examples::

            >>> per_image = explained.source_maps(inputs.pixel_values)  # [[(T, H, W), ...]]
        """
        tokens, samples = self._token_maps(pixel_values, targets, layers, internal_batch_size)
        out = []
        for b, sample in enumerate(samples):
            placed = source_maps(view_maps(tokens[b], sample), sample, interpolate_mode)
            maps = [m for m, _ in placed]
            if normalize:
                maps = _normalize_jointly(placed)
            out.append(maps)
        return out


def _normalize_jointly(placed: Sequence[Tuple[Tensor, Tensor]]) -> List[Tensor]:
    """Per target, min-max over the covered pixels of all of a sample's sources together."""
    k = placed[0][0].shape[0]
    values = torch.cat(
        [m.reshape(k, -1)[:, v.reshape(-1)] for m, v in placed], dim=1
    )  # (K, covered pixels)
    low = values.min(dim=1).values
    high = values.max(dim=1).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    out = []
    for m, v in placed:
        shape = (k, *([1] * (m.dim() - 1)))
        scaled = torch.where(
            (high > low).view(shape), (m - low.view(shape)) / span.view(shape), torch.zeros_like(m)
        )
        out.append(scaled.masked_fill(~v, 0.0))
    return out


@contextlib.contextmanager
def _restored(module: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Attributes of ``module`` its forward writes (Qwen-VL's ``rope_deltas``), put back."""
    saved = {name: module.__dict__[name] for name in names if name in module.__dict__}
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                module.__dict__[name] = saved[name]


# ---------------------------------------------------------------------- high-level helper


@dataclass(frozen=True)
class AnswerExplanation:
    """The answer of a vision-language model with one LeGrad map per token.

    Attributes:
        tokens: The answer's tokens as text, one per map.
        answer_ids: ``(T,)`` the answer's token ids.
        maps: ``(T, H, W)`` LeGrad maps in ``[0, 1]``, one per answer token, on the
            processed image (``pixel_values``' size). Families described by views
            (Qwen-VL): on the original image, ``(T, H, W)``, or ``(T, F, H, W)`` for a
            video of ``F`` frames.
        answer_map: ``(H, W)`` the whole answer's map (the sum of the token maps before
            normalisation; for the one-grid families, of the summed logits).
        pixel_values: ``(1, C, H, W)`` the processed image the maps belong to; for the
            view families the original image as a float tensor in ``[0, 1]``
            (``(F, C, H, W)`` for a video).
        text: The decoded answer.
        logits: ``(T,)`` each answer token's logit, with ``scores=True`` (else None).
        probabilities: ``(T,)`` each answer token's probability under teacher forcing
            (the softmax over the vocabulary at its predicting position), with
            ``scores=True`` (else None).
    """

    tokens: List[str]
    answer_ids: Tensor
    maps: Tensor
    answer_map: Tensor
    pixel_values: Tensor
    text: str
    logits: Optional[Tensor] = None
    probabilities: Optional[Tensor] = None


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _placement(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where the model takes its inputs and the dtype of its (first) floating weights. A
    model accelerate dispatches (``device_map``, offload) takes them on its execution
    device: its parameters may be on the meta device (offloaded) or spread over devices."""
    params = list(model.parameters())
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    hook: Any = getattr(model, "_hf_hook", None)
    where = getattr(hook, "execution_device", None)
    if where is None:
        where = next((p.device for p in params if p.device.type != "meta"), "cpu")
    if isinstance(where, int):  # accelerate names a GPU by its index
        return torch.device("cuda", where), dtype
    return torch.device(where), dtype


def explain_answer(
    model: nn.Module,
    processor: Any,
    image: Any,
    prompt: str,
    answer: Optional[str] = None,
    *,
    max_new_tokens: int = 32,
    layers: Optional[Sequence[int]] = None,
    skip_special_tokens: bool = True,
    scores: bool = False,
) -> AnswerExplanation:
    r"""Answer ``prompt`` about ``image`` (greedily, unless ``answer`` is given) and explain
    every answer token with LeGrad.

    Args:
        model (nn.Module): A supported vision-language model (see :class:`AnswerLogits`).
        processor (Any): Its processor: called as ``processor(images=[image],
                    text=[prompt], return_tensors="pt")``; its tokenizer
                    (``processor.tokenizer``) encodes a given answer and decodes tokens.
        image (Any): The image, as the processor takes it (PIL image, array, tensor).
        prompt (str): The prompt text, with the model's image placeholder where the
                    processor expects it (e.g. ``"USER: <image>\nWhat is this? ASSISTANT:"``
                    for LLaVA-1.5).
        answer (str, optional): The answer to explain, teacher-forced; None generates it
                    greedily (``do_sample=False``).
                    Default: None
        max_new_tokens (int, optional): Longest generated answer.
                    Default: 32
        layers (Sequence[int], optional): Decoder layers whose maps are summed.
                    Default: None (all)
        skip_special_tokens (bool, optional): Leave the answer's trailing special tokens
                    (end of sequence, padding) out of the explained answer.
                    Default: True
        scores (bool, optional): Also give each answer token's logit and probability
                    (:meth:`AnswerLogits.vocabulary_logits`, one more forward).
                    Default: False

    Returns:
        :class:`AnswerExplanation`: the tokens, their maps, the whole-answer map.

    Examples::

        >>> result = explain_answer(vlm, processor, image, "USER: <image>\nWhat animal? ASSISTANT:")
        >>> result.text, result.maps.shape  # ("A cat.", (T, H, W))
        >>> from captum_legrad.viz import plot_answer
        >>> plot_answer(result.pixel_values, result.maps, result.tokens,
        ...             answer_map=result.answer_map)
    """
    from ..attribution import LeGrad

    tokenizer = _tokenizer(processor)
    from ..adapters.hf.vlm import describe

    if describe(model).views is not None:
        on_views, (explained_views, pixels) = _explain_views(
            model, processor, image, prompt, answer, max_new_tokens, layers, skip_special_tokens
        )
        return _with_scores(on_views, explained_views, pixels) if scores else on_views
    batch = processor(images=[image], text=[prompt], return_tensors="pt")
    input_ids: Tensor = batch["input_ids"]
    pixel_values: Tensor = batch["pixel_values"]
    attention_mask: Optional[Tensor] = batch.get("attention_mask")
    token_type_ids: Optional[Tensor] = batch.get("token_type_ids")
    device, dtype = _placement(model)
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    if answer is None:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids.to(device)}
        generate: Any = model.generate
        with torch.no_grad():
            output = generate(
                input_ids=input_ids.to(device),
                pixel_values=pixel_values,
                attention_mask=None if attention_mask is None else attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                **extra,
            )
        answer_ids = output[0, input_ids.shape[1] :].cpu()
    else:
        answer_ids = torch.as_tensor(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if skip_special_tokens:  # trailing end-of-sequence and padding tokens
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        kept = answer_ids.tolist()
        while kept and kept[-1] in special:
            kept.pop()
        answer_ids = torch.tensor(kept, dtype=torch.long)
    if answer_ids.numel() == 0:
        raise ValueError(
            "The answer has no tokens to explain (the model answered with special tokens "
            "only); give an answer, or raise max_new_tokens."
        )
    explained = AnswerLogits(
        model,
        input_ids.to(device),
        answer_ids.long().to(device),
        attention_mask,
        token_type_ids=token_type_ids,
    )
    legrad = LeGrad(explained, layers=layers)
    t = answer_ids.numel()
    grids = legrad.attribute_multi(pixel_values, targets=list(range(t)), normalize=False)
    from .._core.maps import minmax_normalize

    maps = minmax_normalize(grids)[0]
    answer_map = minmax_normalize(grids.sum(dim=1, keepdim=True))[0, 0]
    tokens = [tokenizer.decode([i]) for i in answer_ids.tolist()]
    text = tokenizer.decode(answer_ids.tolist())
    result = AnswerExplanation(tokens, answer_ids, maps, answer_map, pixel_values.detach(), text)
    return _with_scores(result, explained, pixel_values) if scores else result


def _with_scores(
    result: AnswerExplanation, explained: AnswerLogits, pixels: Tensor
) -> AnswerExplanation:
    """``result`` with each answer token's logit and probability (one more forward)."""
    logits = explained.vocabulary_logits(pixels)[0]  # (T, V)
    answer = result.answer_ids.to(logits.device).long().unsqueeze(-1)
    return replace(
        result,
        logits=logits.gather(-1, answer).squeeze(-1).cpu(),
        probabilities=logits.softmax(-1).gather(-1, answer).squeeze(-1).cpu(),
    )


def _answer_ids(
    tokenizer: Any, answer: Optional[str], generated: Optional[Tensor], skip_special: bool
) -> Tensor:
    """The answer's ids: the given text's, or the generated ones without trailing specials."""
    if answer is not None:
        ids = torch.as_tensor(tokenizer(answer, add_special_tokens=False)["input_ids"])
    else:
        assert generated is not None
        ids = generated
    if skip_special:  # trailing end-of-sequence and padding tokens
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        kept = ids.tolist()
        while kept and kept[-1] in special:
            kept.pop()
        ids = torch.tensor(kept, dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError(
            "The answer has no tokens to explain (the model answered with special tokens "
            "only); give an answer, or raise max_new_tokens."
        )
    return ids.long()


def _is_video(value: Any) -> bool:
    """A list of frames, or a 4-D array or tensor ``(F, …)``."""
    if isinstance(value, (list, tuple)):
        return True
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 4


def _as_pixels(value: Any) -> Tensor:
    """An image (PIL, ``(H, W, C)`` array, ``(C, H, W)`` tensor) → ``(C, H, W)`` float in
    ``[0, 1]``; a video (frames, or ``(F, …)``) → ``(F, C, H, W)``."""
    if isinstance(value, (list, tuple)):
        return torch.stack([_as_pixels(frame) for frame in value])
    if isinstance(value, Tensor):
        tensor = value.detach().cpu()
        if tensor.dim() == 4:
            return torch.stack([_as_pixels(frame) for frame in tensor])
        tensor = tensor.float()
        return tensor / 255.0 if not value.is_floating_point() else tensor
    import numpy as np

    array = np.array(value)  # a copy: PIL images give read-only arrays
    if array.ndim == 4:
        return torch.stack([_as_pixels(frame) for frame in array])
    tensor = torch.as_tensor(array)
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(-1)
    if tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)
    tensor = tensor.float()
    return tensor / 255.0 if array.dtype == np.uint8 else tensor


def _explain_views(
    model: nn.Module,
    processor: Any,
    image: Any,
    prompt: str,
    answer: Optional[str],
    max_new_tokens: int,
    layers: Optional[Sequence[int]],
    skip_special_tokens: bool,
) -> Tuple[AnswerExplanation, Tuple[AnswerLogits, Tensor]]:
    """:func:`explain_answer` for families described by views: every processor output by
    its name, the maps on the original image (or video); and the scores module with its
    pixels (for :func:`_with_scores`)."""
    from .._core.maps import minmax_normalize, upsample

    tokenizer = _tokenizer(processor)
    video = _is_video(image)
    given = {"videos": [image]} if video else {"images": [image]}
    batch = dict(processor(text=[prompt], return_tensors="pt", **given))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        if isinstance(v, Tensor)
        else v
        for k, v in batch.items()
    }
    input_ids = batch.pop("input_ids")
    attention_mask = batch.pop("attention_mask", None)
    from ..adapters.hf.vlm import describe

    rules = describe(model).views
    assert rules is not None
    main = rules.main_input(batch)
    pixels = batch.pop(main)
    generated = None
    if answer is None:
        generate: Any = model.generate
        for_model = {k: v for k, v in batch.items() if k not in rules.consumed}
        with torch.no_grad():
            output = generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                do_sample=False, **{main: pixels}, **for_model,
            )  # fmt: skip
        generated = output[0, input_ids.shape[1] :].cpu()
    answer_ids = _answer_ids(tokenizer, answer, generated, skip_special_tokens)
    original = _as_pixels(image)
    if not video and "image_sizes" in rules.consumed and batch.get("image_sizes") is None:
        # InternVL and Llama 4 processors do not return the original size their tiles need
        batch["image_sizes"] = torch.tensor([list(original.shape[-2:])])
    explained = AnswerLogits(model, input_ids, answer_ids.to(device), attention_mask, **batch)
    canvas = explained.source_maps(pixels, layers=layers, normalize=False)[0][0].float()
    size = (original.shape[0], *original.shape[-2:]) if video else tuple(original.shape[-2:])
    raw = upsample(canvas.unsqueeze(0), size)[0]
    rank = len(size)
    maps = minmax_normalize(raw, dims=rank)
    answer_map = minmax_normalize(raw.sum(dim=0), dims=rank)
    tokens = [tokenizer.decode([i]) for i in answer_ids.tolist()]
    text = tokenizer.decode(answer_ids.tolist())
    shown = original if video else original.unsqueeze(0)
    result = AnswerExplanation(tokens, answer_ids, maps, answer_map, shown, text)
    return result, (explained, pixels)
