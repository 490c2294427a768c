"""Per-library adapters: recognise a model and describe it as a :class:`~captum_legrad.ViTSpec`.

Each adapter (a module or a package per library: :mod:`.timm`, :mod:`.hf`,
:mod:`.open_clip`, :mod:`.torchvision`) exposes ``match(model) -> ViTSpec | None`` and only
describes where things are in a model; every piece of model-family knowledge lives here and
in the :class:`~captum_legrad.ViTSpec` it builds, and the computation
(``captum_legrad._core``) knows none. The adapters are listed, with their libraries, extras
and command-line loaders, in :data:`captum_legrad.families.FAMILIES`, and consulted by
:func:`captum_legrad.discover`. Helpers every adapter may use live in :mod:`.common`.
"""
