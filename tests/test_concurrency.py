"""Reliability: threads sharing one model, compiled and wrapped models, many calls, interrupts
(docs/design.md, "Threads, processes and compiled models")."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from conftest import make_model, randomize
from test_side_effects import assert_unchanged, snapshot
from torch import Tensor, nn

from captum_legrad import LeGrad, UnsupportedModelError, discover
from captum_legrad.baselines import GenericAttention, ViTGradCAM
from captum_legrad.internals import ScopedHooks


def _torchvision_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=5,
    )
    return randomize(model, 1).eval()


Job = Tuple[str, int, Tensor, int]  # (method, model index, images, target)


def _run(models: List[nn.Module], job: Job) -> Tensor:
    method, which, x, target = job
    model = models[which]
    if method == "legrad":
        return LeGrad(model).attribute(x, target=target)
    if method == "multi":
        return LeGrad(model, layers=[-1]).attribute_multi(x, targets=[target, (target + 1) % 5])
    if method == "gae":
        return GenericAttention(model).attribute(x, target=target)
    return ViTGradCAM(model).attribute(x, target=target)


def test_threads_sharing_models_get_the_sequential_maps() -> None:
    """8 threads × 6 calls on two shared models (timm SDPA and torchvision MHA), LeGrad and two
    baselines, random targets: every result equals the same call made alone."""
    models = [make_model("vit"), _torchvision_vit()]
    gen = torch.Generator().manual_seed(0)
    methods = ("legrad", "multi", "gae", "gradcam")
    jobs: List[List[Job]] = [
        [
            (
                methods[int(torch.randint(4, (1,), generator=gen))],
                int(torch.randint(2, (1,), generator=gen)),
                torch.randn(2, 3, 32, 32, generator=gen),
                int(torch.randint(5, (1,), generator=gen)),
            )
            for _ in range(6)
        ]
        for _ in range(8)
    ]
    expected = [[_run(models, job) for job in thread_jobs] for thread_jobs in jobs]
    results: Dict[Tuple[int, int], Tensor] = {}
    errors: List[BaseException] = []
    start = threading.Barrier(len(jobs))

    def work(t: int) -> None:
        try:
            start.wait()
            for i, job in enumerate(jobs[t]):
                results[(t, i)] = _run(models, job)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert len(results) == 48
    for (t, i), got in results.items():
        torch.testing.assert_close(got, expected[t][i], rtol=0, atol=1e-6)
    assert {m.__class__.__name__ for m in models} == {"VisionTransformer"}
    for model in models:
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_scoped_hooks_act_only_in_their_own_thread() -> None:
    layer = nn.Linear(2, 2)
    seen: List[str] = []
    with ScopedHooks() as hooks:
        hooks.forward(layer, lambda module, args, output: seen.append("hook"))
        other = threading.Thread(target=lambda: layer(torch.zeros(1, 2)))
        other.start()
        other.join()
        assert seen == []  # another thread's forward of the same module
        layer(torch.zeros(1, 2))
        assert seen == ["hook"]
    layer(torch.zeros(1, 2))
    assert seen == ["hook"] and not layer._forward_hooks


def test_compiled_model_is_explained_through_the_module_it_wraps(images: Callable) -> None:
    model = make_model("vit")
    compiled = torch.compile(model)
    assert discover(compiled).root is model
    x = images(2)
    expected = LeGrad(model).attribute(x, target=[1, 3])
    torch.testing.assert_close(LeGrad(compiled).attribute(x, target=[1, 3]), expected)
    torch.testing.assert_close(
        GenericAttention(compiled).attribute(x, target=1),
        GenericAttention(model).attribute(x, target=1),
    )


def test_compiled_submodule_is_refused_in_one_line() -> None:
    wrapper = nn.Sequential(nn.Identity(), torch.compile(make_model("vit")))
    with pytest.raises(UnsupportedModelError, match=r"torch\.compile'd module \(1\)") as info:
        LeGrad(wrapper)
    assert "\n" not in str(info.value) and "_orig_mod" in str(info.value)


def test_data_parallel_and_ddp_are_looked_through(images: Callable, tmp_path: Path) -> None:
    import torch.distributed as dist

    model = make_model("vit")
    x = images(2)
    expected = LeGrad(model).attribute(x, target=2)
    parallel = nn.DataParallel(model)
    torch.testing.assert_close(LeGrad(parallel).attribute(x, target=2), expected)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert discover(ddp).root is model
        torch.testing.assert_close(LeGrad(ddp).attribute(x, target=2), expected)
    finally:
        dist.destroy_process_group()


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), Tensor))


def test_many_calls_leave_nothing_behind(images: Callable) -> None:
    """No tensor survives a call: the count of live tensors is flat over 30 calls."""
    model = make_model("siglip_map")  # attention pool: the second capture path too
    legrad = LeGrad(model)
    x = images(2)
    for _ in range(3):
        legrad.attribute(x, target=1)
        legrad.attribute_multi(x, targets=[0, 1])
    before = _live_tensors()
    for _ in range(15):
        out = legrad.attribute(x, target=1)
        multi = legrad.attribute_multi(x, targets=[0, 1])
    del out, multi
    assert _live_tensors() <= before


def test_keyboard_interrupt_mid_call_leaves_the_model_unchanged(images: Callable) -> None:
    model = make_model("vit")
    before = snapshot(model)
    calls = {"n": 0}

    def interrupt(module: nn.Module, args: Any, output: Any) -> None:
        calls["n"] += 1
        raise KeyboardInterrupt

    handle = model.blocks[1].attn.proj.register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            LeGrad(model).attribute(images(2), target=1)
    finally:
        handle.remove()
    assert calls["n"] == 1
    assert_unchanged(before, snapshot(model))
    LeGrad(model).attribute(images(1), target=1)  # and it still works
