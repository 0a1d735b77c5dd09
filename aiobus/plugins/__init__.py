"""Plugins for a :class:`aiobus.Bus`: one module each, built on the core's public API."""

__all__: list[str] = []
