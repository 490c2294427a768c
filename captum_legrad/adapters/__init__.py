"""Per-library adapters: recognise a model and describe it as a :class:`~captum_legrad.ViTSpec`.

Each adapter module exposes ``match(model) -> ViTSpec | None`` and only describes
where things are in a model; the LeGrad computation itself lives in
:mod:`captum_legrad.compute`. The adapters are listed, with their libraries, extras and
command-line loaders, in :data:`captum_legrad.families.FAMILIES`, and consulted by
:func:`captum_legrad.discover`. Shared helpers live in :mod:`.common`.
"""
