"""LeGrad in Captum Insights' method menu.

Captum Insights (``captum.insights``) exists only up to captum 0.8.0, which needs
``numpy<2``; captum 0.9.0 removed it. Install the ``insights`` extra in an environment of its
own: ``pip install "captum-legrad[insights]"``.

:func:`register` adds LeGrad to the dictionaries Insights reads its methods from
(``captum.insights.attr_vis.config.ATTRIBUTION_NAMES_TO_METHODS`` and
``ATTRIBUTION_METHOD_CONFIG``), in place, so the web app and the notebook widget offer it
with three arguments: ``layers`` (a text field: ``all`` or block indices such as ``-2,-1``),
``pooling`` (``mean`` or ``model``) and ``interpolate_mode``. Insights builds the method as
``cls(model)`` for every example and calls ``attribute.__wrapped__`` with those arguments;
the class it builds is :class:`InsightsLeGrad`, a :class:`~captum_legrad.LeGrad` whose
``attribute`` also takes ``layers`` and ``pooling``.

Open-vocabulary models work as any classifier: give Insights an
:class:`~captum_legrad.ImageTextSimilarity` as the model and its prompts as the classes.

Examples::

    >>> from captum.insights import AttributionVisualizer, Batch
    >>> from captum.insights.attr_vis.features import ImageFeature
    >>> from captum_legrad import insights
    >>> insights.register()
    'LeGrad'
    >>> vis = AttributionVisualizer(models=[model], classes=class_names,
    ...     features=[ImageFeature("Photo", baseline_transforms=[],
    ...                            input_transforms=[normalize])],
    ...     dataset=batches, score_func=lambda o: o.softmax(-1))
    >>> insights.select(vis)  # optional: open the app with LeGrad chosen
    >>> vis.serve(port=6080)
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import captum
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.log import log_usage

from . import LeGrad

__all__ = ["NAME", "InsightsLeGrad", "parse_layers", "register", "select", "unregister"]

#: The name LeGrad has in Insights' method menu (:meth:`LeGrad.get_name`).
NAME = LeGrad.get_name()

_INTERPOLATE_MODES = ["bilinear", "nearest", "bicubic"]
_HELP = (
    "LeGrad (arXiv 2404.03214): gradients of each layer's score with respect to that "
    "layer's attention maps. layers: 'all' or block indices such as '-2,-1'; pooling: "
    "'mean' (the paper) or 'model' (the model's own readout)."
)


def parse_layers(value: Union[str, Sequence[int], None]) -> Optional[Tuple[int, ...]]:
    """Read the ``layers`` argument as Insights' text field sends it.

    Idempotent, as Insights needs: it re-applies its ``post_process`` converters to the
    same dictionary for every example, so a value already converted passes through.

    Args:
        value: ``"all"`` (or an empty string, or None) for all blocks, or block indices
            separated by commas and/or spaces (``"-2,-1"``, ``"0 5 11"``), or a sequence
            of ints.

    Returns:
        None (all blocks) or a tuple of block indices.

    Raises:
        ValueError: The text is neither ``all`` nor a list of integers.

    Examples::

        >>> parse_layers("-2, -1")
        (-2, -1)
        >>> parse_layers(parse_layers("all")) is None
        True
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "all", "none"):
            return None
        parts = [part for part in re.split(r"[,\s]+", text) if part]
        try:
            return tuple(int(part) for part in parts)
        except ValueError:
            raise ValueError(
                f"layers must be 'all' or block indices such as '-2,-1', got {value!r}."
            ) from None
    if isinstance(value, Sequence):
        items = tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
        if len(items) == len(value):
            return items
    raise ValueError(f"layers must be 'all' or block indices such as '-2,-1', got {value!r}.")


class InsightsLeGrad(LeGrad):
    r"""LeGrad as Captum Insights uses it: ``layers`` and ``pooling`` per call.

    Insights constructs its methods with the model alone (``InsightsLeGrad(model)``, once
    per example) and passes the user's settings to ``attribute``; this class accepts
    LeGrad's constructor options there too. Everything else, including the output (the
    input's shape, which Insights' image feature needs), is :class:`~captum_legrad.LeGrad`.

    Args:
        forward_func (Callable): As in :class:`~captum_legrad.LeGrad`.
        layers (Sequence[int], optional): The default when ``attribute`` gets none.
                    Default: None (all blocks)
        pooling (str, optional): The default when ``attribute`` gets none.
                    Default: "mean"
        spec (ViTSpec, optional): As in :class:`~captum_legrad.LeGrad`.
                    Default: None

    Examples::

        >>> from captum_legrad.insights import InsightsLeGrad
        >>> attr = InsightsLeGrad(model).attribute(x, target=3, layers="-2,-1")
    """

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        *,
        layers: Union[str, Sequence[int], None] = None,
        pooling: Optional[str] = None,
        **kwargs: Any,
    ) -> TensorOrTupleOfTensorsGeneric:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): As in
                        :meth:`captum_legrad.LeGrad.attribute`.
            target (int, tuple, Tensor, or list, optional): As in
                        :meth:`captum_legrad.LeGrad.attribute`.
                        Default: None
            additional_forward_args (Any, optional): As in
                        :meth:`captum_legrad.LeGrad.attribute`.
                        Default: None
            layers (str or Sequence[int], optional): ``"all"``, block indices as text
                        (``"-2,-1"``) or a sequence of ints.
                        Default: None (the instance's layers)
            pooling (str, optional): ``"mean"`` or ``"model"``.
                        Default: None (the instance's pooling)
            **kwargs (Any, optional): The keyword options of
                        :meth:`captum_legrad.LeGrad.attribute` (``interpolate_mode``,
                        ``normalize``, ``output``, ...).

        Returns:
            *Tensor* or *tuple[Tensor, ...]* of **attributions**:
            - **attributions** (*Tensor* or *tuple[Tensor, ...]*):
                        As in :meth:`captum_legrad.LeGrad.attribute`.

        Examples::

            >>> attr = InsightsLeGrad(model).attribute(x, target=3, layers="all",
            ...                                        pooling="model")
        """
        chosen: Optional[Sequence[int]] = self.layers if layers is None else parse_layers(layers)
        method = LeGrad(
            self.forward_func,
            chosen,
            pooling=self.pooling if pooling is None else pooling,
            spec=self.spec,
        )
        return method.attribute(inputs, target, additional_forward_args, **kwargs)


def _config() -> Any:
    """``captum.insights.attr_vis.config``, or an ImportError saying how to get it."""
    try:
        from captum.insights.attr_vis import config
    except ImportError as err:
        version = getattr(captum, "__version__", "unknown")
        raise ImportError(
            f"Captum Insights is not available with the installed captum {version} "
            f"({err}). Insights exists only up to captum 0.8.0 (captum 0.9.0 removed it), "
            "which needs numpy<2. Install the 'insights' extra in an environment of its own: "
            'pip install "captum-legrad[insights]" (captum==0.8.0, numpy<2, flask, '
            "flask-compress, ipywidgets)."
        ) from err
    return config


def _parameters(config: Any) -> Any:
    return config.ConfigParameters(
        params={
            "layers": config.StrConfig(value="all"),
            "pooling": config.StrEnumConfig(value="mean", limit=["mean", "model"]),
            "interpolate_mode": config.StrEnumConfig(value="bilinear", limit=_INTERPOLATE_MODES),
        },
        help_info=_HELP,
        post_process={"layers": parse_layers},
    )


def register() -> str:
    """Add LeGrad to Captum Insights' method menu (captum 0.8.0).

    Mutates ``captum.insights.attr_vis.config.ATTRIBUTION_NAMES_TO_METHODS`` and
    ``ATTRIBUTION_METHOD_CONFIG`` in place (Insights' modules hold references to these
    dictionaries, so replacing them would have no effect). Calling it again changes nothing.

    Returns:
        The method's name in the menu, ``"LeGrad"``.

    Raises:
        ImportError: The installed captum has no Insights (captum 0.9.0 and later); the
            message names the ``insights`` extra.

    Examples::

        >>> from captum_legrad import insights
        >>> insights.register()
        'LeGrad'
    """
    config = _config()
    if (
        config.ATTRIBUTION_NAMES_TO_METHODS.get(NAME) is InsightsLeGrad
        and NAME in config.ATTRIBUTION_METHOD_CONFIG
    ):
        return NAME
    config.ATTRIBUTION_NAMES_TO_METHODS[NAME] = InsightsLeGrad
    config.ATTRIBUTION_METHOD_CONFIG[NAME] = _parameters(config)
    return NAME


def unregister() -> None:
    """Remove LeGrad from Insights' method menu again (if it is there).

    Raises:
        ImportError: As :func:`register`.
    """
    config = _config()
    config.ATTRIBUTION_NAMES_TO_METHODS.pop(NAME, None)
    config.ATTRIBUTION_METHOD_CONFIG.pop(NAME, None)


def select(visualizer: Any, **arguments: Any) -> None:
    """Open an ``AttributionVisualizer`` with LeGrad chosen (and registered).

    Insights has no public way to choose the initial method; this sets the visualizer's
    (private) ``_config`` as Captum's own tests do, so it depends on captum 0.8.0.

    Args:
        visualizer: A ``captum.insights.AttributionVisualizer``.
        **arguments: Values for ``layers``, ``pooling`` and ``interpolate_mode``, as the
            UI would send them (strings); the rest keep their defaults.

    Raises:
        ValueError: An argument LeGrad's Insights entry does not have.

    Examples::

        >>> insights.select(vis, layers="-2,-1")
    """
    config = _config()
    register()
    params: Dict[str, Any] = config.ATTRIBUTION_METHOD_CONFIG[NAME].params
    unknown = sorted(set(arguments) - set(params))
    if unknown:
        raise ValueError(f"unknown LeGrad argument(s) {unknown}; known: {sorted(params)}.")
    values = {key: param.value for key, param in params.items()}
    values.update(arguments)
    visualizer._config = visualizer._config._replace(
        attribution_method=NAME, attribution_arguments=values
    )
