"""Loading a model for the command line: ``default`` (the bundled shapes ViT) or
``FAMILY:NAME`` for every family of :data:`captum_legrad.families.FAMILIES` (``timm:NAME``,
``open_clip:NAME[/TAG]``, ``hf:ID_OR_PATH``, ``torchvision:NAME``).

Weights come from one of three places, chosen by the caller:

- the library's pretrained weights by their usual name (timm's default tag,
  an OpenCLIP pretrained tag, a Hugging Face hub id, torchvision's ``DEFAULT`` weights
  enum), downloaded by the library or taken from its cache;
- a local file (``weights=``: ``.safetensors`` or a ``torch.save`` state dict);
- random initialisation, only when asked for (``random_weights=True``).

When the hub cannot be reached (or ``HF_HUB_OFFLINE=1`` and nothing is cached), a loader
raises :class:`ModelError` with one line that says how to pass local weights.

Each loader returns a :class:`LoadedModel`: the module to explain (scores ``(B, K)``), the
model's own preprocessing (the library's transform and its geometry, a
:class:`~captum_legrad.eval.preprocess.View`), class names when known, and for image-text
models a way to turn prompts into a model whose scores are the prompts' similarities.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import logging
import math
import os
import re
import socket
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .preprocess import View

__all__ = [
    "LoadedModel",
    "ModelError",
    "load_model",
    "load_weights",
    "model_choices",
    "load_timm",
    "load_open_clip",
    "load_hf",
    "load_torchvision",
    "import_extra",
    "one_line",
    "quiet_libraries",
    "hub_unreachable",
]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """A model specification or weight file that cannot be used (bad name, path, extra)."""


@dataclass
class LoadedModel:
    """A model ready for explanation.

    Attributes:
        model: Returns scores ``(B, K)`` for normalised images.
        image_size: Input ``(H, W)``.
        mean, std: Per-channel normalisation of ``[0, 1]`` images.
        classes: Class names, when known.
        with_prompts: For image-text models, builds a model whose ``K`` scores are the
                    similarities with the given prompts (then targets index the prompts).
        multilabel: The classes are independent (sigmoid) rather than exclusive (softmax).
        patch_size: The ViT's patch size, for perturbation tests.
        view: The model's evaluation preprocessing (resize, centre crop).
        transform: The library's own preprocessing, a PIL image → the normalised input
                    ``(3, H, W)``; None: ``view`` then ``normalize`` (torch).
        weights: Where the weights came from, in words (``"pretrained (hub)"``,
                    ``"file w.pth"``, ``"random"``, ``"bundled"``).
        random_init: The weights are random (nothing it shows was learned).
        shapes_model: The bundled synthetic-shapes model (meaningless on photos).
        trained_size: The input size the model was trained at, when :meth:`at_size`
                    changed ``image_size`` (None: ``image_size``).
    """

    model: nn.Module
    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    classes: Optional[List[str]] = None
    with_prompts: Optional[Callable[[Sequence[str]], nn.Module]] = None
    multilabel: bool = False
    patch_size: Tuple[int, int] = (16, 16)
    extra: Dict[str, Any] = field(default_factory=dict)
    view: Optional[View] = None
    transform: Optional[Callable[[Any], Tensor]] = None
    weights: str = ""
    random_init: bool = False
    shapes_model: bool = False
    trained_size: Optional[Tuple[int, int]] = None

    def normalize(self, images: Tensor) -> Tensor:
        """``[0, 1]`` images → the model's input."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        return (images - mean) / std

    def preprocessing(self) -> View:
        """The :class:`View` (resize and centre crop) of this model's preprocessing."""
        return self.view if self.view is not None else View(crop=self.image_size)

    def at_size(self, size: Tuple[int, int]) -> LoadedModel:
        """The same model explained at another input size ``(H, W)`` (``--image-size``).

        The preprocessing keeps its framing, scaled: a "resize the shorter side to 256,
        centre-crop 224" model at 448 resizes to 512 and crops 448. The library's own
        transform is replaced by this scaled view (bilinear, antialiased) and the model's
        normalisation. LeGrad then resamples the position embedding for each call
        (``resize_pos_embed``); the model runs outside its training resolution.
        """
        height, width = int(size[0]), int(size[1])
        if height < 1 or width < 1:
            raise ModelError(f"--image-size must be positive, got {height}x{width}")
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ModelError(
                f"--image-size {height}x{width} is not a multiple of the model's "
                f"{self.patch_size[0]}x{self.patch_size[1]} patches"
            )
        view = self.preprocessing()
        scale_h, scale_w = height / view.crop[0], width / view.crop[1]
        scaled = View(
            crop=(height, width),
            resize=view.resize,
            size=(round(view.size[0] * scale_h), round(view.size[1] * scale_w)),
        )
        return dataclasses.replace(
            self,
            image_size=(height, width),
            view=scaled,
            transform=None,
            trained_size=self.trained_size or self.image_size,
        )

    def prepare(self, photo: Any) -> Tensor:
        """A PIL RGB image → the model's normalised input ``(3, H, W)``, as the model expects."""
        if self.transform is not None:
            x: Tensor = self.transform(photo)
            return x.float()
        import numpy as np

        array = np.asarray(photo, dtype=np.float32) / 255.0
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return self.normalize(self.preprocessing().apply(image))


# --------------------------------------------------------------------------- weights

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(_ANSI.sub("", text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def load_weights(path: Path) -> Dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    Checkpoints that wrap the weights in ``state_dict`` / ``model`` / ``module`` entries, or
    prefix them with ``module.``, are unwrapped.

    Raises:
        ModelError: The file is missing, not a state dict (a pickled model object, another
            format) or corrupt; the message is one line.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError
            raise ModelError(
                f"cannot read weights {path}: not a valid .safetensors file "
                f"({one_line(str(error))})"
            ) from error
    else:
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4"
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # the unpickler's errors vary by torch version
            text = _ANSI.sub("", str(error))
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            if found:
                raise ModelError(
                    f"weights {path} hold a pickled Python object ({found.group(1)}), not a "
                    "state dict: save them with torch.save(model.state_dict(), PATH) or as "
                    ".safetensors and pass that file"
                ) from error
            raise ModelError(
                f"cannot read weights {path}: not a PyTorch state dict (.pth, .pt, .bin) or a "
                ".safetensors file"
            ) from error
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"weights {path} do not hold a state dict (name → tensor)")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}


def _examples(names: Sequence[str], count: int = 2) -> str:
    shown = ", ".join(names[:count])
    return shown + (", …" if len(names) > count else "")


def _load_into(model: nn.Module, path: Optional[Path], name: str) -> None:
    """Load ``path`` into ``model``; a misfit is described in one line."""
    if path is None:
        return
    state = load_weights(path)
    reference = model.state_dict()
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(reference[k].shape)}"
        for k in reference
        if k in state and state[k].shape != reference[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
        if mismatched:
            parts.append(
                f"{len(mismatched)} of another shape, file vs model ({_examples(mismatched)})"
            )
        hint = ""
        head = [
            k
            for k in mismatched
            if k.split(" ")[0].split(".")[-2:][0] in ("head", "fc", "classifier")
        ]
        if mismatched and len(head) == len(mismatched) and not missing and not unexpected:
            classes = state[mismatched[0].split(" ")[0]].shape[0]
            hint = f"; the file's classifier has {classes} classes: pass --num-classes {classes}"
        raise ModelError(f"weights {path} do not fit {name}: {'; '.join(parts)} tensors{hint}")
    state = {k: v.to(reference[k].dtype) for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(f"weights {path} do not fit {name}: {one_line(str(error))}") from error


def import_extra(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModelError(
            f"this model needs the {module} package: pip install 'captum-legrad[{extra}]'"
        ) from error


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


#: Seconds :func:`load_model` waits for the hub by default before it gives up.
HUB_TIMEOUT = 10.0

# the settings of the load_model call in progress: what to say before a download and how
# long to wait; the reason the hub was not tried, for the error message
_HUB: Dict[str, Any] = {"announce": None, "timeout": HUB_TIMEOUT, "unanswered": None}


def probe_host(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except Exception:  # OSError, socket.timeout, a name that does not resolve, ...
        return False


def _hub_host(family: str) -> Tuple[str, int]:
    if family == "torchvision":
        return "download.pytorch.org", 443
    try:
        from huggingface_hub import constants

        endpoint = urllib.parse.urlparse(constants.ENDPOINT)
        return endpoint.hostname or "huggingface.co", endpoint.port or 443
    except ImportError:
        return "huggingface.co", 443


@contextlib.contextmanager
def _hub(spec: str, family: str, weights: bool = True) -> Iterator[None]:
    """Around a loader's download: say so first, and wait for the hub only so long.

    Unless ``HF_HUB_OFFLINE`` is set (then the cache is all there is, at once): says
    (through ``load_model(announce=...)``) "loading pretrained weights of SPEC from the
    hub..."; then one TCP connection to the hub's host is
    tried with the timeout first: when it does not open, the call runs offline (the cache
    only), so a missing file fails at once instead of after the libraries' retries; when
    it opens, huggingface_hub's ETag and download timeouts (its ``HF_HUB_ETAG_TIMEOUT`` /
    ``HF_HUB_DOWNLOAD_TIMEOUT``, as environment variables and as its constants) and the
    socket default timeout (torch.hub's downloads) are the timeout for the call. Everything
    is restored afterwards.
    """
    announce = _HUB["announce"]
    timeout = float(_HUB["timeout"])
    _HUB["unanswered"] = None
    if _offline():  # the cache only: nothing to wait for
        yield
        return
    if announce is not None and weights:
        announce(f"loading pretrained weights of {spec} from the hub...")
    host, port = _hub_host(family)
    reachable = probe_host(host, port, timeout)
    seconds = str(max(1, math.ceil(timeout)))
    env = {"HF_HUB_ETAG_TIMEOUT": seconds, "HF_HUB_DOWNLOAD_TIMEOUT": seconds}
    values: Dict[str, Any] = {
        "HF_HUB_ETAG_TIMEOUT": int(seconds),
        "HF_HUB_DOWNLOAD_TIMEOUT": int(seconds),
    }
    if not reachable:
        env["HF_HUB_OFFLINE"] = "1"
        values["HF_HUB_OFFLINE"] = True
        _HUB["unanswered"] = f"{host} did not answer within {timeout:g} s"
    constants: Any = None
    try:
        from huggingface_hub import constants
    except ImportError:
        pass
    saved_env = {key: os.environ.get(key) for key in env}
    saved = {key: getattr(constants, key) for key in values if hasattr(constants, key)}
    socket_timeout = socket.getdefaulttimeout()
    try:
        os.environ.update(env)
        for key in saved:
            setattr(constants, key, values[key])
        socket.setdefaulttimeout(timeout)
        yield
    finally:
        socket.setdefaulttimeout(socket_timeout)
        for key, value in saved.items():
            setattr(constants, key, value)
        for key, old in saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def hub_unreachable(spec: str, error: Optional[BaseException], how: str) -> ModelError:
    unanswered = _HUB["unanswered"]
    reason = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
    if unanswered:
        reason = f"the hub cannot be reached ({unanswered})"
    elif error is not None and not _offline():
        reason += f" ({one_line(str(error), 120)})"
    return ModelError(
        f"cannot load the pretrained weights of {spec}: {reason} and they are not cached; {how}"
    )


_PASS_WEIGHTS = (
    "download them where the hub is reachable, or pass a local file with --weights FILE "
    "(.safetensors or a torch.save state dict), or --random-weights for an untrained model"
)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the libraries' logging and warnings while a model is built.

    OpenCLIP, for one, logs "No pretrained weights loaded ... initialized randomly" even when
    the weights are loaded from ``--weights`` right after; what was loaded is reported by
    the command instead.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _source(weights: Optional[Path], random_weights: bool, pretrained: str) -> Tuple[str, bool]:
    if weights is not None:
        return f"file {weights}", False
    if random_weights:
        return "random (--random-weights)", True
    return pretrained, False


def _spatial_size(value: Any) -> Tuple[int, int]:
    """``(H, W)``: the last two entries of a size such as ``(3, H, W)``, or ``(s, s)``."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return int(value[0]), int(value[0])
        return int(value[-2]), int(value[-1])
    return int(value), int(value)


# --------------------------------------------------------------------------- loaders


def _default(weights: Optional[Path], random_weights: bool = False) -> LoadedModel:
    from ..data import build_model, default_model_config, load_default_model

    if random_weights:
        raise ModelError(
            "--model default is the bundled shapes model with its own weights; "
            "drop --random-weights"
        )
    config = default_model_config()
    if weights is None:
        model = load_default_model()
    else:
        model = build_model(config)
        _load_into(model, weights, "--model default (the bundled 64×64 shapes ViT)")
        model.eval()
    kwargs = config["model_kwargs"]
    size = _spatial_size(config["image_size"])
    return LoadedModel(
        model=model,
        image_size=size,
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        classes=list(config["classes"]),
        multilabel=bool(config.get("multilabel", False)),
        patch_size=_spatial_size(kwargs["patch_size"]),
        view=View(crop=size),
        weights="bundled" if weights is None else f"file {weights}",
        shapes_model=True,
    )


def timm_view(config: Dict[str, Any]) -> View:
    """The geometry of ``timm.data.create_transform(**config)`` (evaluation)."""
    import math

    crop = _spatial_size(config["input_size"])
    pct = float(config.get("crop_pct") or 0.875)
    scale = (math.floor(crop[0] / pct), math.floor(crop[1] / pct))
    mode = config.get("crop_mode") or "center"
    if mode == "squash":
        return View(crop=crop, resize="exact", size=scale)
    if mode == "border":
        return View(crop=crop, resize="longest", size=(max(scale), max(scale)))
    return View(crop=crop, resize="shortest", size=(min(scale), min(scale)))


def _timm_classes(timm: Any, model: nn.Module) -> Optional[List[str]]:
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
    except Exception:  # no label data for this model
        return None
    if info.num_classes() != getattr(model, "num_classes", None):
        return None
    return [info.index_to_description(i) for i in range(info.num_classes())]


def load_timm(
    name: str,
    weights: Optional[Path],
    num_classes: Optional[int],
    random_weights: bool = False,
) -> LoadedModel:
    """A timm model by name: timm's pretrained weights, a local file or random weights."""
    timm = import_extra("timm", "timm")
    kwargs: Dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    pretrained = weights is None and not random_weights
    spec = f"timm:{name}"
    if not name.startswith("hf-hub:") and not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r}; see timm.list_models()")
    try:
        with quiet_libraries(), _hub(spec, "timm") if pretrained else contextlib.nullcontext():
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as error:  # timm: "Unknown model (...)", or a download error
        if "Unknown model" in str(error) or not pretrained:
            raise ModelError(f"unknown timm model {name!r}: {one_line(str(error))}") from error
        raise hub_unreachable(spec, error, _PASS_WEIGHTS) from error
    except Exception as error:  # hub errors: LocalEntryNotFoundError, URLError, ...
        if not pretrained:
            raise
        raise hub_unreachable(spec, error, _PASS_WEIGHTS) from error
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if pretrained and not any(cfg.get(k) for k in ("hf_hub_id", "url", "file", "state_dict")):
        raise ModelError(
            f"timm has no pretrained weights for {name}: pass --weights FILE or --random-weights"
        )
    _load_into(model, weights, spec)
    model.eval()
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    source, random_init = _source(weights, random_weights, "pretrained (timm hub)")
    return LoadedModel(
        model=model,
        image_size=_spatial_size(config["input_size"]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        classes=_timm_classes(timm, model),
        patch_size=_spatial_size(patch),
        view=timm_view(config),
        transform=create_transform(**config),
        weights=source,
        random_init=random_init,
    )


def open_clip_view(cfg: Dict[str, Any]) -> View:
    """The geometry of OpenCLIP's evaluation preprocess (``preprocess_cfg``)."""
    size = _spatial_size(cfg.get("size", 224))
    mode = cfg.get("resize_mode") or "shortest"
    if mode == "squash":
        return View(crop=size, resize="exact", size=size)
    edge = max(size) if mode == "longest" else min(size)
    return View(crop=size, resize=mode, size=(edge, edge))


def load_open_clip(
    name: str,
    weights: Optional[Path],
    num_classes: Optional[int] = None,
    random_weights: bool = False,
) -> LoadedModel:
    """An OpenCLIP model ``NAME[/TAG]``: a pretrained tag, a local file or random weights."""
    if num_classes is not None:
        raise ModelError("--num-classes does not apply to open_clip models (prompts are classes)")
    open_clip = import_extra("open_clip", "open_clip")
    tag: Optional[str] = None
    if not name.startswith("hf-hub:") and "/" in name:
        name, tag = name.split("/", 1)
    spec = f"open_clip:{name}" + (f"/{tag}" if tag else "")
    if not name.startswith("hf-hub:") and name not in open_clip.list_models():
        raise ModelError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    hub = name.startswith("hf-hub:")
    tags = [] if hub else list(open_clip.list_pretrained_tags_by_model(name))
    if tag is not None and (weights is not None or random_weights):
        raise ModelError(f"{spec} names pretrained weights: drop --weights / --random-weights")
    if tag is not None and tag not in tags:
        raise ModelError(
            f"unknown pretrained tag {tag!r} for open_clip:{name}; "
            f"tags: {', '.join(tags) or 'none'}"
        )
    if tag is None and not hub and weights is None and not random_weights:
        example = f"open_clip:{name}/{tags[0]}" if tags else f"open_clip:{name}"
        raise ModelError(
            f"open_clip:{name} names no weights: add a pretrained tag ({example}; tags: "
            f"{', '.join(tags[:6]) or 'none'}{', …' if len(tags) > 6 else ''}), "
            "or pass --weights FILE or --random-weights"
        )
    create = open_clip.create_model_and_transforms
    # open_clip < 2.27 has no weights_only (its torch.load then uses torch's default, which
    # is weights_only=True from torch 2.6 on)
    safe = {"weights_only": True} if "weights_only" in inspect.signature(create).parameters else {}
    online = tag is not None or hub
    try:
        with quiet_libraries(), _hub(spec, "open_clip") if online else contextlib.nullcontext():
            model, _, transform = create(name, pretrained=tag, **safe)
    except Exception as error:  # download errors surface as RuntimeError / OSError
        if tag is None and not hub:
            raise ModelError(f"cannot build open_clip:{name}: {one_line(str(error))}") from error
        raise hub_unreachable(spec, error, _PASS_WEIGHTS) from error
    _load_into(model, weights, spec)
    model.eval()
    tokenizer: Callable[..., Any] = open_clip.get_tokenizer(name)
    context = getattr(model, "context_length", None)
    if isinstance(context, int) and getattr(tokenizer, "context_length", None) is None:
        # open_clip < 2.23 hands out its plain tokenize function: 77 tokens whatever the
        # model's context; give it the model's
        tokenizer = functools.partial(tokenizer, context_length=context)
    visual: Any = model.visual
    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    # open_clip < 2.23 has no preprocess_cfg: its preprocess resizes the shortest edge to the
    # tower's image_size and crops, with the tower's image_mean / image_std
    cfg.setdefault("size", getattr(visual, "image_size", 224))
    for key in ("mean", "std"):
        if getattr(visual, f"image_{key}", None) is not None:
            cfg.setdefault(key, tuple(getattr(visual, f"image_{key}")))
    size = _spatial_size(cfg["size"])
    view = open_clip_view(cfg)

    def with_prompts(prompts: Sequence[str]) -> nn.Module:
        from ..scores.text import ImageTextSimilarity

        return ImageTextSimilarity.from_prompts(model, list(prompts), tokenizer)

    source, random_init = _source(weights, random_weights, f"pretrained ({tag or name})")
    return LoadedModel(
        model=model,
        image_size=size,
        mean=tuple(cfg.get("mean", _CLIP_MEAN)),
        std=tuple(cfg.get("std", _CLIP_STD)),
        with_prompts=with_prompts,
        patch_size=_spatial_size(getattr(visual, "patch_size", 16)),
        view=view,
        transform=transform,
        weights=source,
        random_init=random_init,
    )


class _Logits(nn.Module):
    """An HF image classifier returning its logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        logits: Tensor = self.model(pixel_values=images).logits
        return logits


def _field(size: Any, key: str) -> Optional[int]:
    value = getattr(size, key, None)
    if value is None and isinstance(size, dict):
        value = size.get(key)
    return int(value) if value is not None else None


def hf_view(processor: Any, image_size: Tuple[int, int]) -> View:
    """The geometry of an HF image processor: resize (exact or shortest edge), centre crop."""
    size = getattr(processor, "size", None)
    do_crop = bool(getattr(processor, "do_center_crop", False))
    crop_size = getattr(processor, "crop_size", None)
    crop = image_size
    if do_crop and crop_size is not None and _field(crop_size, "height"):
        crop = (int(_field(crop_size, "height") or 0), int(_field(crop_size, "width") or 0))
    if size is not None and _field(size, "shortest_edge"):
        edge = int(_field(size, "shortest_edge") or 0)
        return View(crop=crop, resize="shortest", size=(edge, edge))
    if size is not None and _field(size, "height"):
        exact = (int(_field(size, "height") or 0), int(_field(size, "width") or 0))
        return View(crop=crop if do_crop else exact, resize="exact", size=exact)
    return View(crop=crop, resize="exact", size=crop)


def load_hf(
    name: str,
    weights: Optional[Path] = None,
    num_classes: Optional[int] = None,
    random_weights: bool = False,
) -> LoadedModel:
    """A transformers model from a local folder or a hub id (``google/vit-base-patch16-224``)."""
    if weights is not None:
        raise ModelError("hf:PATH loads the weights in the folder; drop --weights")
    if num_classes is not None:
        raise ModelError("hf:PATH takes its classes from the folder's config; drop --num-classes")
    path = Path(name)
    local = path.is_dir()
    if not local and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise ModelError(
            f"hf:PATH must be a local model folder (config.json) or a hub id ORG/NAME: "
            f"{name} not found"
        )
    transformers = import_extra("transformers", "transformers")
    from ..adapters.hf import image_text_class

    how = "save it with save_pretrained where the hub is reachable and pass hf:FOLDER"
    source = str(path) if local else name
    scope = (
        contextlib.nullcontext() if local else _hub(f"hf:{name}", "hf", weights=not random_weights)
    )
    try:
        with quiet_libraries(), scope:
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
            text_model = image_text_class(config) is not None
            loader = (
                transformers.AutoModel
                if text_model
                else transformers.AutoModelForImageClassification
            )
            if random_weights:
                model = loader.from_config(config).eval()
            else:
                model = loader.from_pretrained(source, local_files_only=local).eval()
            try:
                processor: Any = transformers.AutoImageProcessor.from_pretrained(
                    source, local_files_only=local
                )
            except (OSError, ValueError):
                processor = None
    except OSError as error:
        if local:
            raise ModelError(
                f"cannot read the model folder {path}: {one_line(str(error))}"
            ) from error
        raise hub_unreachable(f"hf:{name}", error, how) from error
    vision = config.vision_config if text_model else config
    image_size = _spatial_size(getattr(vision, "image_size", 224))
    mean = tuple(getattr(processor, "image_mean", None) or _IMAGENET_MEAN)
    std = tuple(getattr(processor, "image_std", None) or _IMAGENET_STD)
    view = hf_view(processor, image_size)
    transform: Optional[Callable[[Any], Tensor]] = None
    if processor is not None:

        def transform(photo: Any) -> Tensor:
            pixels: Tensor = processor(images=photo, return_tensors="pt")["pixel_values"][0]
            return pixels

    weights_text = (
        "random (--random-weights)"
        if random_weights
        else (f"folder {path}" if local else "pretrained (Hugging Face hub)")
    )
    if text_model:
        with quiet_libraries():
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local)

        def with_prompts(prompts: Sequence[str]) -> nn.Module:
            from ..scores.text import ImageTextSimilarity

            return ImageTextSimilarity.from_prompts(model, list(prompts), tokenizer)

        return LoadedModel(
            model=model,
            image_size=image_size,
            mean=mean,
            std=std,
            with_prompts=with_prompts,
            patch_size=_spatial_size(vision.patch_size),
            view=view,
            transform=transform,
            weights=weights_text,
            random_init=random_weights,
        )
    labels = getattr(config, "id2label", None) or {}
    return LoadedModel(
        model=_Logits(model).eval(),
        image_size=image_size,
        mean=mean,
        std=std,
        classes=[labels[i] for i in sorted(labels)] if labels else None,
        patch_size=_spatial_size(getattr(config, "patch_size", 16)),
        view=view,
        transform=transform,
        weights=weights_text,
        random_init=random_weights,
    )


def _torchvision_cached(url: str) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()


def load_torchvision(
    name: str,
    weights: Optional[Path],
    num_classes: Optional[int] = None,
    random_weights: bool = False,
) -> LoadedModel:
    """A torchvision ViT by builder name (``vit_b_16``): ``DEFAULT`` weights, a file or random."""
    torchvision = import_extra("torchvision", "torchvision")
    from torchvision.models.vision_transformer import VisionTransformer
    from torchvision.transforms._presets import ImageClassification

    try:
        enum: Any = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        enum = None
    kwargs: Dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    pretrained = weights is None and not random_weights
    spec = f"torchvision:{name}"
    if pretrained and enum is None:
        try:
            torchvision.models.get_model_builder(name)
        except ValueError as error:
            raise ModelError(f"unknown torchvision model {name!r}: {error}") from error
        raise ModelError(f"torchvision has no pretrained weights for {name}: pass --weights FILE")
    if pretrained and _offline() and not _torchvision_cached(enum.url):
        raise hub_unreachable(spec, None, _PASS_WEIGHTS)
    try:
        hub = _hub(spec, "torchvision") if pretrained else contextlib.nullcontext()
        with quiet_libraries(), hub:
            model = torchvision.models.get_model(
                name, weights=enum if pretrained else None, **kwargs
            )
    except ValueError as error:  # "Unknown model name", or num_classes against the weights
        if "Unknown model" in str(error) or "unknown" in str(error).lower():
            raise ModelError(
                f"unknown torchvision model {name!r}: {one_line(str(error))}"
            ) from error
        raise ModelError(f"cannot build {spec}: {one_line(str(error))}") from error
    except Exception as error:  # the download: URLError, HTTPError, OSError
        raise hub_unreachable(spec, error, _PASS_WEIGHTS) from error
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"torchvision:{name} is not a VisionTransformer; LeGrad explains the vit_* models"
        )
    _load_into(model, weights, spec)
    size = _spatial_size(model.image_size)
    if enum is not None:
        transform = enum.transforms()
        crop = _spatial_size(transform.crop_size)
        resize = int(transform.resize_size[0])
        if crop != size:  # the weights' preset is for another size than this model's
            transform = ImageClassification(
                crop_size=size[0], resize_size=round(size[0] * resize / crop[0])
            )
    else:
        transform = ImageClassification(crop_size=size[0], resize_size=round(size[0] * 256 / 224))
    resize_edge = int(transform.resize_size[0])
    categories = list(enum.meta.get("categories", [])) if enum is not None else []
    heads: Any = model.heads
    outputs = int(heads.head.out_features) if hasattr(heads, "head") else None
    source, random_init = _source(weights, random_weights, f"pretrained ({enum})")
    return LoadedModel(
        model=model.eval(),
        image_size=size,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        classes=categories if categories and outputs == len(categories) else None,
        patch_size=_spatial_size(model.patch_size),
        view=View(crop=size, resize="shortest", size=(resize_edge, resize_edge)),
        transform=lambda photo: transform(photo),
        weights=source,
        random_init=random_init,
    )


def model_choices() -> str:
    """What ``--model`` accepts, from the family registry."""
    from ..families import FAMILIES

    names = [f"{row.name}:{row.name_hint}" for row in FAMILIES if row.loader is not None]
    return "default | " + " | ".join(names)


def load_model(
    spec: str,
    weights: Optional[Path] = None,
    num_classes: Optional[int] = None,
    random_weights: bool = False,
    *,
    announce: Optional[Callable[[str], None]] = None,
    hub_timeout: float = HUB_TIMEOUT,
) -> LoadedModel:
    """Load ``default`` or ``FAMILY:NAME`` (see :func:`model_choices`).

    Without ``weights`` or ``random_weights`` the library's pretrained weights are loaded
    (downloaded by the library when the hub is reachable, else from its cache). The loader of
    each family is named in its :data:`~captum_legrad.families.FAMILIES` row.

    Before a download, ``announce`` is called with "loading pretrained weights of SPEC from
    the hub..."; the hub gets ``hub_timeout`` seconds to answer (one connection attempt),
    else the weights come from the cache or the call fails at once (see ``_hub``).

    Raises:
        ModelError: An unknown specification or model name, a missing, corrupt or
            misfitting weights file, pretrained weights that cannot be downloaded, or a
            missing optional dependency (naming the extra). The message is one line.
    """
    from ..families import family

    if weights is not None and random_weights:
        raise ModelError("--weights and --random-weights exclude each other")
    if spec == "default":
        if num_classes is not None:
            raise ModelError(
                "--model default is the bundled shapes model with its own classes; "
                "drop --num-classes"
            )
        return _default(weights, random_weights)
    prefix, colon, name = spec.partition(":")
    if not colon or not name:
        raise ModelError(f"unknown model {spec!r}: use {model_choices()}")
    try:
        row = family(prefix)
    except KeyError:
        row = None
    if row is None or row.loader is None:
        raise ModelError(f"unknown model family {prefix!r} in {spec!r}: use {model_choices()}")
    module_name, _, function = row.loader.partition(":")
    loader = getattr(importlib.import_module(module_name), function)
    previous = dict(_HUB)
    _HUB.update(announce=announce, timeout=hub_timeout, unanswered=None)
    try:
        loaded: LoadedModel = loader(name, weights, num_classes, random_weights=random_weights)
    finally:
        _HUB.update(previous)
    return loaded
