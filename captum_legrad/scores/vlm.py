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

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import CaptureError
from ..spec import PatchLayout, ViTSpec

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
    image_keys: Tensor  # (B, g_h·g_w): key positions of the image patches, row-major


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
    and ``Gemma3ForConditionalGeneration``, with ``sdpa`` or ``eager`` attention
    (``docs/models.md``).

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

    Examples::

        >>> from captum_legrad import LeGrad, AnswerLogits
        >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
        >>> answer = vlm.generate(**inputs, max_new_tokens=8)[:, inputs.input_ids.shape[1]:]
        >>> explained = AnswerLogits(vlm, inputs.input_ids, answer, inputs.attention_mask)
        >>> maps = LeGrad(explained).attribute_multi(
        ...     inputs.pixel_values, targets=range(answer.shape[1]))  # (1, T, H, W)
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
        self._local = threading.local()

    def __getstate__(self) -> Dict[str, Any]:
        # The per-thread plan of the last forward is not copied (deepcopy, pickle).
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._local = threading.local()

    # ------------------------------------------------------------------ the sequence

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
        batch = pixel_values.shape[0]
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
        prompt, mask = prompt.gather(1, order), mask.gather(1, order)
        ids = torch.cat([prompt, answer], dim=1)
        full_mask = torch.cat([(mask != 0).long(), torch.ones_like(answer)], dim=1)
        if types is not None:
            answer_types = torch.full_like(answer, int(parts.answer_type_id or 0))
            types = torch.cat([types.gather(1, order), answer_types], dim=1)
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
        predicting = torch.arange(s - 1, s + t - 1, device=device).expand(batch, t)
        if answer_mask is None:
            kept = torch.ones_like(answer, dtype=torch.bool)
        else:
            kept = _repeat_rows(answer_mask.to(device), batch, "answer_mask") != 0
        if s == 0 or bool((mask.sum(dim=1) == 0).any()):
            raise ValueError("Every prompt needs at least one token (the image tokens).")
        return _Plan(ids, full_mask, types, predicting, answer, kept, keys)

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

        The prompt and answer given here (e.g. through Captum's ``additional_forward_args``,
        which ``internal_batch_size`` splits with the images) replace those given at
        construction.
        """
        plan = self._plan(
            pixel_values, input_ids, answer_ids, attention_mask, token_type_ids, answer_mask
        )
        self._local.plan = plan
        kwargs: dict = {"use_cache": False}
        if plan.token_type_ids is not None:
            kwargs["token_type_ids"] = plan.token_type_ids
        out = self.parts.inner(
            input_ids=plan.input_ids,
            pixel_values=pixel_values,
            attention_mask=plan.attention_mask,
            **kwargs,
        )
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return self._logits(hidden, plan, normed=True)

    # ------------------------------------------------------------------ LeGrad

    def _readout(self, tokens: Tensor) -> Tensor:
        return self._logits(tokens, self._current(), normed=False)

    def _layout(self, inputs: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        plan = self._current()
        if n_keys != plan.input_ids.shape[1]:
            raise CaptureError(
                f"The language model's attention has {n_keys} keys but the sequence has "
                f"{plan.input_ids.shape[1]} tokens; AnswerLogits supports models whose "
                "decoder layers attend over the whole prompt and answer."
            )
        image = inputs[0]
        grid = self.parts.grid(image.shape[-2], image.shape[-1])
        return PatchLayout(plan.image_keys, grid)

    def legrad_spec(self) -> ViTSpec:
        """The language model's decoder layers as blocks, the image tokens as patches, and
        the logit lens (final norm and ``lm_head`` at the predicting positions) as readout."""
        parts = self.parts
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
        )

    def _score_rows(self, inputs: Tuple[Any, ...]) -> Tensor:
        return self._current().positions

    @property
    def num_answer_tokens(self) -> int:
        """``T``, the answer tokens given at construction."""
        return int(self.get_buffer("answer_ids").shape[1])


# ---------------------------------------------------------------------- high-level helper


@dataclass(frozen=True)
class AnswerExplanation:
    """The answer of a vision-language model with one LeGrad map per token.

    Attributes:
        tokens: The answer's tokens as text, one per map.
        answer_ids: ``(T,)`` the answer's token ids.
        maps: ``(T, H, W)`` LeGrad maps in ``[0, 1]``, one per answer token, on the
            processed image (``pixel_values``' size).
        answer_map: ``(H, W)`` the whole answer's map (the summed logits).
        pixel_values: ``(1, C, H, W)`` the processed image the maps belong to.
        text: The decoded answer.
    """

    tokens: List[str]
    answer_ids: Tensor
    maps: Tensor
    answer_map: Tensor
    pixel_values: Tensor
    text: str


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
    return AnswerExplanation(tokens, answer_ids, maps, answer_map, pixel_values.detach(), text)
