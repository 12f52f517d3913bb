"""Lets the scripts in src/ run by path: they import the `iclora` of the src/ beside them.

Registers this src/ folder as the package `iclora`, whatever else is installed: a script run
from one checkout never runs another checkout's code (say, one installed with `pip install
-e .`). An installed copy of this same folder is the same code, so nothing changes there.
"""

import importlib.util
import sys
from pathlib import Path


def ensure_package() -> None:
    src = Path(__file__).resolve().parent
    loaded = sys.modules.get("iclora")
    if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve().parent == src:
        return
    for name in [n for n in sys.modules if n == "iclora" or n.startswith("iclora.")]:  # another copy's modules
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location("iclora", src / "__init__.py", submodule_search_locations=[str(src)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["iclora"] = module
    spec.loader.exec_module(module)
