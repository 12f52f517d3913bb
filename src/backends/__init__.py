"""Model backends behind one interface (see base.py). Pick one by name."""

from __future__ import annotations

from typing import Any

from .base import Backend
from .registry import ByBackend, BackendSpec, backend_names, backend_spec, register

# The built-in backends, one line each: importing a spec module registers it (registry.py).
from . import sdxl_spec  # noqa: E402,F401
from . import flux_spec  # noqa: E402,F401
from . import flux2_spec  # noqa: E402,F401

# name -> 'module:Class'; imported lazily so `--backend sdxl` never imports FLUX code.
BACKENDS = ByBackend("backend_class")


def backend_class(name: str) -> type:
    """The backend's class, whose attributes (pixel quantum, preferred precision) are known
    before any weights are loaded."""
    return backend_spec(name).load()


def load_backend(name: str, model_id: str, conditioning: str, **options: Any) -> Backend:
    """Load backend `name` (one of backend_names()) with its weights from `model_id`."""
    return backend_class(name).from_pretrained(model_id, conditioning=conditioning, **options)


__all__ = ["Backend", "BACKENDS", "BackendSpec", "backend_class", "backend_names", "backend_spec", "load_backend",
           "register"]
