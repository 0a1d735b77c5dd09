"""aiobus: an asyncio-native process bus and process supervisor.

A process publishes its lifecycle (start, stop, graceful, exit, a periodic main
tick, log) on a :class:`Bus`, and plugins subscribe to it.

Layers, from the bottom up; each uses only the public API of the ones below it:

1. the bus core: ``_state`` (states, errors), ``_channels`` (subscriptions and their
   order), ``_ticker`` (the main tick), ``_logging`` (the default log listener),
   ``_reexec`` (restart in place), ``_tasks`` (the tasks a bus owns), ``_bus`` (the
   Bus), ``_plugin`` (SimplePlugin) and ``_daemon`` (daemonizing, before any loop runs).
   The core imports no plugin.
2. ``aiobus.plugins``: one module per plugin, built on the core's public API only.
"""

from ._bus import Bus as Bus
from ._bus import BusStatistics as BusStatistics
from ._channels import ChannelFailures as ChannelFailures
from ._daemon import Daemon as Daemon
from ._daemon import daemonize as daemonize
from ._logging import configure_logging as configure_logging
from ._logging import log_to_structlog as log_to_structlog
from ._plugin import SimplePlugin as SimplePlugin
from ._state import State as State
from ._state import StateError as StateError

__all__ = [
    "Bus",
    "BusStatistics",
    "ChannelFailures",
    "Daemon",
    "SimplePlugin",
    "State",
    "StateError",
    "configure_logging",
    "daemonize",
    "log_to_structlog",
]
