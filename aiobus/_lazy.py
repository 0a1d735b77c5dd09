"""Names a package exports, imported on first use (PEP 562), so that ``import aiobus`` costs
next to nothing and a child broker's worker loads only the modules its function needs."""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's, which ``import aiobus`` does not load
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose ``exports`` map each of its
    submodules (relative, ``"._bus"``) to the names it exports. A name is imported from its
    module the first time it is asked for, then kept in the package's ``namespace``."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
