"""A package's public names loaded with their modules on first use (PEP 562), so that importing one light module
of the package (the settings, a parser) does not import the heavy ones (JAX)."""

from __future__ import annotations

import importlib
import importlib.util


def lazy_exports(package: str, homes: dict[str, tuple[str, ...]], namespace: dict):
    """(__getattr__, __dir__, __all__) for `package`, whose public names live in its modules as `homes` says
    ({module relative to the package: names}); a submodule's own name gives the submodule."""
    module_of = {name: module for module, names in homes.items() for name in names}

    def __getattr__(name):
        if name in module_of:
            value = getattr(importlib.import_module(f".{module_of[name]}", package), name)
            namespace[name] = value  # once: later lookups skip this function
            return value
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(module_of))

    return __getattr__, __dir__, sorted(module_of)
