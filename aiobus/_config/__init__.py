"""Services declared in a file: ``aiobus run --config aiobus.toml``, ``--procfile Procfile``, ``aiobus check``.

- ``schema.py``: the keys of each table, one declarative table each, which drive both the
  validation and the README's table of keys;
- ``validate.py``: a TOML file to a checked :class:`ServiceSpec`, every problem collected;
- ``envfile.py``: environment files (``KEY=VALUE`` lines);
- ``procfile.py``: Procfiles (``name: command`` lines);
- ``build.py``: a spec made into supervisors, programs and brokers on a bus;
- ``commands.py``: what the ``aiobus`` command calls.

It sits above the plugins, next to the command: the bus core and the plugins know nothing of it.
"""

from __future__ import annotations

from .build import Service as Service
from .build import build as build
from .validate import ConfigError as ConfigError
from .validate import ServiceSpec as ServiceSpec
from .validate import load_service as load_service

__all__ = ["ConfigError", "Service", "ServiceSpec", "build", "load_service"]
