"""The published GRL network as a benchmark baseline: spandrel's copy of it, when installed.

spandrel (0.4.2 tested; ``pip install spandrel==0.4.2 --no-deps``) keeps the published GRL
modules nearly verbatim (its one deviation: ``out_channels`` defaults to 3, so it is always
passed). Its package ``__init__`` imports every architecture, two of which import torchvision
at import time although GRL does not use it. Where torchvision cannot be imported (a missing or
mismatched build), :func:`published_grl_class` puts a stub module with the three names those
imports ask for into ``sys.modules`` (calling the stub raises); it never replaces a working
torchvision. Nothing here downloads anything.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

SPANDREL_HINT = "pip install --no-deps spandrel==0.4.2 safetensors"


def _stub_torchvision() -> None:
    try:
        importlib.import_module("torchvision.transforms.functional")
        return
    except Exception:  # noqa: BLE001 - missing, or a build that does not match this torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    def _unavailable(*args, **kwargs):
        raise RuntimeError("torchvision stub (grl_kernels.bench.published): torchvision is not available")

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = type("InterpolationMode", (), {})
    functional.rotate = functional.normalize = _unavailable
    tv.transforms, transforms.functional = transforms, functional
    sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})


def spandrel_available() -> bool:
    return importlib.util.find_spec("spandrel") is not None


def published_grl_class():
    """spandrel's GRL class (the published network); RuntimeError with the install hint if absent."""
    if not spandrel_available():
        raise RuntimeError(f"the published GRL baseline needs spandrel: {SPANDREL_HINT}")
    _stub_torchvision()
    if "spandrel" not in sys.modules:
        for name in [m for m in sys.modules if m.startswith("spandrel.")]:
            del sys.modules[name]  # a failed import may have left half-initialized modules
    importlib.import_module("spandrel")
    return importlib.import_module("spandrel.architectures.GRL.__arch.grl").GRL


def build_published(kwargs: dict):
    """The published GRL built with our constructor keywords (``out_channels`` made explicit)."""
    cls = published_grl_class()
    kw = dict(kwargs)
    kw.pop("backend", None)
    kw.setdefault("out_channels", kw.get("in_channels", 3))
    return cls(**kw)
