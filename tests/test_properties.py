"""Property-based checks (hypothesis) over batch size, image size, target forms and layers."""

from __future__ import annotations

from typing import Any, List

import torch
from conftest import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import oracle_legrad

from captum_legrad import LeGrad

MODEL = make_model("vit_dynamic", depth=4)
CLASSES = 5


@st.composite
def cases(draw: Any) -> tuple:
    batch = draw(st.integers(1, 3))
    height = 8 * draw(st.integers(2, 6))
    width = 8 * draw(st.integers(2, 6))
    classes = draw(st.lists(st.integers(0, CLASSES - 1), min_size=batch, max_size=batch))
    form = draw(st.sampled_from(["int", "list", "tensor", "tuple_list", "scalar_tensor"]))
    if form in ("int", "scalar_tensor"):
        classes = [classes[0]] * batch
    layers = draw(
        st.one_of(
            st.none(),
            st.lists(st.integers(-4, 3), min_size=1, max_size=4, unique_by=lambda i: i % 4),
        )
    )
    seed = draw(st.integers(0, 2**16))
    return batch, height, width, classes, form, layers, seed


def _target(form: str, classes: List[int]) -> object:
    if form == "int":
        return classes[0]
    if form == "scalar_tensor":  # (negative targets are refused: tests/test_errors.py)
        return torch.tensor(classes[0])
    if form == "list":
        return list(classes)
    if form == "tensor":
        return torch.tensor(classes)
    return [(c,) for c in classes]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matches_oracle_and_is_batch_equivalent(case: tuple) -> None:
    batch, height, width, classes, form, layers, seed = case
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    legrad = LeGrad(MODEL, layers)
    got = legrad.attribute(x, target=_target(form, classes), output="map")  # type: ignore[arg-type]
    assert got.shape == (batch, 1, height, width)
    assert torch.isfinite(got).all() and got.min() >= 0 and got.max() <= 1
    expected = oracle_legrad(MODEL, x, torch.tensor(classes), layers)
    assert (got - expected).abs().max() <= 1e-5
    last = legrad.attribute(x[-1:], target=classes[-1], output="map")
    assert (got[-1:] - last).abs().max() <= 1e-5
