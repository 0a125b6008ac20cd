"""This folder is ``fed_plora.kernels``; the top-level import name ``kernels`` is Hugging Face's.

From a checkout's root (the working directory of ``python`` or ``python -m ...``), the folder ``kernels/`` is
also reachable as a top-level package and would shadow Hugging Face's ``kernels``, which transformers and
bitsandbytes import. Imported under that name, this package hands the import over to the next ``kernels`` on
``sys.path`` (Hugging Face's, where installed); where there is none, the import gives an empty namespace
package, as for a folder with no ``__init__.py``, which transformers reads as "not installed".
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

_CHECKOUT_ROOT = Path(__file__).resolve().parents[1]


def hand_over(name: str) -> None:
    """Replace ``sys.modules[name]`` (this folder, imported as ``name``) by the package of that name found on
    ``sys.path`` outside the checkout, or by an empty namespace package when there is none."""
    sys.modules.pop(f"{name}._not_ours", None)
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT_ROOT]
    spec = PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        spec = ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = []
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if spec.loader is not None:
        spec.loader.exec_module(module)
