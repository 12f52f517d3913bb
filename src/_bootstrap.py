"""Lets the scripts in src/training and src/inference run by path from a plain checkout.

When the package is installed (`pip install -e .`) this does nothing; otherwise it
registers src/ as the package `iclora`.
"""

import importlib.util
import sys
from pathlib import Path


def ensure_package() -> None:
    if importlib.util.find_spec("iclora") is not None:
        return
    src = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("iclora", src / "__init__.py", submodule_search_locations=[str(src)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["iclora"] = module
    spec.loader.exec_module(module)
