"""Model backends behind one interface (see base.py). Pick one by name."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Backend

# name -> (module, class); imported lazily so `--backend sdxl` never imports FLUX code.
BACKENDS = {
    "sdxl": ("iclora.backends.sdxl", "SDXLBackend"),
    "flux": ("iclora.backends.flux", "FluxBackend"),
}


def backend_class(name: str) -> type:
    """The backend's class, whose attributes (pixel quantum, preferred precision) are known
    before any weights are loaded."""
    if name not in BACKENDS:
        raise ValueError(f"--backend: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def load_backend(name: str, model_id: str, conditioning: str, **options: Any) -> Backend:
    """Load backend `name` ('sdxl' or 'flux') with its weights from `model_id`."""
    return backend_class(name).from_pretrained(model_id, conditioning=conditioning, **options)


__all__ = ["Backend", "BACKENDS", "backend_class", "load_backend"]
