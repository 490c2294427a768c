"""The lean route keeps a decoder layer's graph at the rows the readout reads
(``ViTSpec.read_rows``, ``captum_legrad.internals.ReadRows``).

The maps are compared with the same computation keeping whole tensors (the spec with
``read_rows=None``), whose exactness against the independent oracle is tested in
``tests/test_vlm.py`` and the family tests; and the bytes the graph keeps are counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

from captum_legrad.internals import ReadRows, RowsKept


class _Decoder(nn.Module):
    """The per-token part of a decoder layer after its attention: o_proj, residual, RMS
    norm (a divisor and rsqrt), a gated SiLU MLP."""

    def __init__(self, width: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.o_proj = nn.Linear(width, width)
        self.gate = nn.Linear(width, hidden)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: Tensor, o: Tensor) -> Tensor:
        h = x + self.o_proj(o)
        normed = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        mlp = self.down(torch.nn.functional.silu(self.gate(normed)) * self.up(normed))
        # Tokens flattened and reordered, as an MoE layer routes them: kept whole.
        order = torch.arange(h.numel() // h.shape[-1]).flip(0)
        flat = normed.reshape(-1, normed.shape[-1])[order].sigmoid()[order.argsort()]
        mlp = mlp + flat.view_as(h)
        return h + mlp.view_as(h) * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1.0)


def _run(rows: Tensor, hooked: bool) -> Tuple[Tensor, List[Tuple[int, int]], List[Tensor]]:
    """The gradient at ``o``; the (kept, whole) elements of each tensor packed at its rows
    and the other tensors saved (parameters aside)."""
    torch.manual_seed(0)
    layer = _Decoder()
    x, o = torch.randn(2, 10, 8), torch.randn(2, 10, 8, requires_grad=True)
    at_rows: List[Tuple[int, int]] = []
    whole: List[Tensor] = []
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    if hooked:
        keep = ReadRows(lambda: rows)
        keep.tokens = (2, 10)

        def pack(tensor: Tensor) -> Any:
            out = keep.pack(tensor)
            if isinstance(out, RowsKept):
                at_rows.append((out.kept.numel(), tensor.numel()))
            elif tensor.untyped_storage().data_ptr() not in weights:
                whole.append(tensor)
            return out

        with torch.autograd.graph.saved_tensors_hooks(pack, keep.unpack):
            z = layer(x, o)
    else:
        z = layer(x, o)
    score = z[torch.arange(2).unsqueeze(1), rows].pow(2).sum()
    (grad,) = torch.autograd.grad(score, o)
    return grad, at_rows, whole


def test_gradient_unchanged_and_memory_at_read_rows() -> None:
    rows = torch.tensor([[9, 4], [3, 3]])  # a repeated row too
    expected, _, _ = _run(rows, hooked=False)
    got, at_rows, whole = _run(rows, hooked=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert expected[0, 9].abs().sum() > 0 and expected[1, 3].abs().sum() > 0
    unread = torch.ones(2, 10, dtype=torch.bool)
    unread[torch.arange(2).unsqueeze(1), rows] = False
    assert got[unread].abs().max() == 0  # ones at the unread rows give exact zeros
    # Every (B, N, ·) activation was kept at 2 of 10 rows per sample, the MLP's included.
    assert len(at_rows) >= 8 and all(kept * 5 == total for kept, total in at_rows)
    assert any(total == 20 * 32 for _, total in at_rows)
    # Only tensors flattened to (B·N, ·) were kept whole (the reordered tokens, what the
    # plain linears save), besides the parameters.
    assert whole and all(t.shape[0] == 20 for t in whole)


def test_tensors_not_over_the_tokens_are_kept_whole() -> None:
    keep = ReadRows(lambda: torch.tensor([[1]]))
    keep.tokens = (1, 4)
    weight = nn.Parameter(torch.randn(4, 3))
    assert keep.pack(weight) is weight
    view = weight.t()
    assert keep.pack(view) is view
    ints = torch.arange(4).view(1, 4)
    assert keep.pack(ints) is ints
    other = torch.randn(3, 5)
    assert keep.pack(other) is other
    keep.tokens = None
    hidden = torch.randn(1, 4, 2)
    assert keep.pack(hidden) is hidden  # outside a selected block


# -------------------------------------------------------------- through AnswerLogits

tf = pytest.importorskip("transformers")


def _spy(monkeypatch: pytest.MonkeyPatch) -> List[Tuple[int, int]]:
    """(kept, whole) elements of every tensor ReadRows packed at its rows."""
    seen: List[Tuple[int, int]] = []
    pack = ReadRows.pack

    def counting(self: ReadRows, tensor: Tensor) -> Any:
        out = pack(self, tensor)
        if isinstance(out, RowsKept):
            seen.append((out.kept.numel(), tensor.numel()))
        return out

    monkeypatch.setattr(ReadRows, "pack", counting)
    return seen


@pytest.mark.parametrize("reduce", [None, "sum"])
@pytest.mark.parametrize("name", ["llava", "gemma3"])
def test_vlm_maps_equal_whole_graph(
    name: str, reduce: Optional[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_vlm import case, left_padded, model_for

    from captum_legrad import AnswerLogits, LeGrad

    model = model_for(name, "sdpa")
    prompts, answers, pixels = case(name)
    ids, mask = left_padded(prompts)
    scores = AnswerLogits(model, ids, answers, mask, reduce=reduce)
    targets = range(3) if reduce is None else [0]
    spec = scores.legrad_spec()
    assert spec.read_rows is not None
    seen = _spy(monkeypatch)
    maps = LeGrad(scores, spec=spec).attribute_multi(
        pixels, targets=targets, output="grid", normalize=False
    )
    kept = sum(k for k, _ in seen)
    whole = sum(w for _, w in seen)
    sequence = ids.shape[1] + answers.shape[1]
    # Every tensor packed was kept at the 3 answer rows of the sequence.
    assert seen and kept * sequence == whole * 3
    seen.clear()
    plain = dataclasses.replace(spec, read_rows=None)
    expected = LeGrad(scores, spec=plain).attribute_multi(
        pixels, targets=targets, output="grid", normalize=False
    )
    assert not seen
    assert expected.abs().max() > 0
    torch.testing.assert_close(maps, expected, rtol=1e-6, atol=1e-7 * expected.abs().max())


def test_explicit_route_keeps_whole_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_vlm import case, left_padded, model_for

    from captum_legrad import AnswerLogits, LeGrad

    model = model_for("llava", "eager")
    prompts, answers, pixels = case("llava")
    ids, mask = left_padded(prompts)
    seen = _spy(monkeypatch)
    LeGrad(AnswerLogits(model, ids, answers, mask), route="explicit").attribute(pixels, target=0)
    assert not seen  # its graph starts before the attention: not per token
