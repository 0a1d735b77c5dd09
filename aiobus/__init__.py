"""aiobus: an asyncio-native process bus and process supervisor.

A process publishes its lifecycle (start, stop, graceful, exit, a periodic main
tick, log) on a :class:`Bus`, and plugins subscribe to it.

Layers, from the bottom up; each uses only the public API of the ones below it:

1. the bus core: ``_state`` (states, errors), ``_exitcodes`` (the exit codes),
   ``_seconds`` (the check of a duration), ``_channels`` (subscriptions and their
   order), ``_ticker`` (the main tick and its schedule), ``_logging`` (the default log
   listener), ``_reexec`` (restart in place), ``_tasks`` (the tasks a bus owns),
   ``_bus`` (the Bus), ``_plugin`` (the Plugin protocol, SimplePlugin), ``_order`` (the
   plugins' priorities, one contract), ``_daemon`` (daemonizing, before any loop
   runs) and ``_environ`` (what children inherit). The core imports no plugin.
2. the link: ``_link`` (framing and codec over a byte stream) and ``_private`` (a
   rendezvous no other local user can reach).
3. supervision, written once for child brokers and external programs: ``_supervision``
   (restart policies, group strategies, intensity and backoff).
4. child brokers, ``_children/``: ``messages`` (the protocol), ``parent`` (the parent's
   side), ``child`` (the child's side, run in an ``anyio.to_process`` worker), ``output``
   (output forwarding) and ``workers`` (the only code touching anyio's process internals).
5. ``aiobus.plugins``: one module per plugin, built on the public API above.
6. ``aiobus.redis`` (the optional ``redis`` extra): bridged buses, fleet operations and
   brokers on a Redis Stream, on the public API; nothing above imports it.

Each public name is imported on first use (``_lazy``): ``import aiobus`` loads none of
the layers, and a child broker's worker loads only what its function needs.
"""

from ._lazy import lazy_exports

TYPE_CHECKING = False  # not typing's: importing typing would cost more than the rest of this module
if TYPE_CHECKING:  # what type checkers see; at run time each name is imported on first use
    from ._bus import Bus as Bus
    from ._bus import BusStatistics as BusStatistics
    from ._channels import ChannelFailures as ChannelFailures
    from ._children.child import ParentLink as ParentLink
    from ._children.output import LineSplitter as LineSplitter
    from ._children.parent import ChildBroker as ChildBroker
    from ._children.parent import ChildUnavailable as ChildUnavailable
    from ._children.workers import end_idle_workers as end_idle_workers
    from ._daemon import Daemon as Daemon
    from ._daemon import DaemonReporter as DaemonReporter
    from ._daemon import daemonize as daemonize
    from ._environ import child_environment as child_environment
    from ._exitcodes import ExitCode as ExitCode
    from ._link import CorruptFrame as CorruptFrame
    from ._link import EndOfLink as EndOfLink
    from ._link import FrameTooLarge as FrameTooLarge
    from ._link import Link as Link
    from ._link import LinkError as LinkError
    from ._link import LinkStatistics as LinkStatistics
    from ._link import UndecodableFrame as UndecodableFrame
    from ._link import UndeliveredMessages as UndeliveredMessages
    from ._logging import configure_logging as configure_logging
    from ._logging import log_to_structlog as log_to_structlog
    from ._order import Priority as Priority
    from ._order import priority as priority
    from ._plugin import Plugin as Plugin
    from ._plugin import SimplePlugin as SimplePlugin
    from ._private import PrivateListener as PrivateListener
    from ._private import connect_private as connect_private
    from ._seconds import check_seconds as check_seconds
    from ._state import State as State
    from ._state import StateError as StateError
    from ._supervision import CHILD_EXIT_CHANNEL as CHILD_EXIT_CHANNEL
    from ._supervision import Child as Child
    from ._supervision import ChildExit as ChildExit
    from ._supervision import ChildInfo as ChildInfo
    from ._supervision import ChildState as ChildState
    from ._supervision import Restart as Restart
    from ._supervision import Strategy as Strategy
    from ._supervision import Supervisor as Supervisor
    from ._supervision import default_supervisor as default_supervisor
    from ._ticker import Schedule as Schedule

#: Each module of the package and the names it exports (tests/test_api.py checks they match the above).
_EXPORTS = {
    "._bus": (
        "Bus",
        "BusStatistics",
    ),
    "._channels": ("ChannelFailures",),
    "._children.child": ("ParentLink",),
    "._children.output": ("LineSplitter",),
    "._children.parent": ("ChildBroker", "ChildUnavailable"),
    "._children.workers": ("end_idle_workers",),
    "._daemon": (
        "Daemon",
        "DaemonReporter",
        "daemonize",
    ),
    "._environ": ("child_environment",),
    "._exitcodes": ("ExitCode",),
    "._link": (
        "CorruptFrame",
        "EndOfLink",
        "FrameTooLarge",
        "Link",
        "LinkError",
        "LinkStatistics",
        "UndecodableFrame",
        "UndeliveredMessages",
    ),
    "._logging": (
        "configure_logging",
        "log_to_structlog",
    ),
    "._order": (
        "Priority",
        "priority",
    ),
    "._plugin": (
        "Plugin",
        "SimplePlugin",
    ),
    "._private": (
        "PrivateListener",
        "connect_private",
    ),
    "._seconds": ("check_seconds",),
    "._state": (
        "State",
        "StateError",
    ),
    "._supervision": (
        "CHILD_EXIT_CHANNEL",
        "Child",
        "ChildExit",
        "ChildInfo",
        "ChildState",
        "Restart",
        "Strategy",
        "Supervisor",
        "default_supervisor",
    ),
    "._ticker": ("Schedule",),
}

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = [
    "CHILD_EXIT_CHANNEL",
    "Bus",
    "BusStatistics",
    "ChannelFailures",
    "Child",
    "ChildBroker",
    "ChildExit",
    "ChildInfo",
    "ChildState",
    "ChildUnavailable",
    "CorruptFrame",
    "Daemon",
    "DaemonReporter",
    "EndOfLink",
    "ExitCode",
    "FrameTooLarge",
    "LineSplitter",
    "Link",
    "LinkError",
    "LinkStatistics",
    "ParentLink",
    "Plugin",
    "Priority",
    "PrivateListener",
    "Restart",
    "Schedule",
    "SimplePlugin",
    "State",
    "StateError",
    "Strategy",
    "Supervisor",
    "UndecodableFrame",
    "UndeliveredMessages",
    "check_seconds",
    "child_environment",
    "configure_logging",
    "connect_private",
    "daemonize",
    "default_supervisor",
    "end_idle_workers",
    "log_to_structlog",
    "priority",
]
