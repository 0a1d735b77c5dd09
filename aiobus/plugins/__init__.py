"""Plugins for a :class:`aiobus.Bus`, one module each, built on the core's public API only.

Each is used as in CherryPy: construct it with the bus, then ``plugin.subscribe()``
(and ``plugin.unsubscribe()`` to detach it).
"""

from .autoreload import Autoreloader as Autoreloader
from .control import ControlSocket as ControlSocket
from .monitor import Monitor as Monitor
from .monitor import MonitorStatistics as MonitorStatistics
from .pidfile import PIDFile as PIDFile
from .pidfile import PIDFileFolderWarning as PIDFileFolderWarning
from .pidfile import PIDFileLockedError as PIDFileLockedError
from .privileges import DropPrivileges as DropPrivileges
from .signals import SignalHandler as SignalHandler
from .subprocess import LineReady as LineReady
from .subprocess import PortReady as PortReady
from .subprocess import Subprocess as Subprocess
from .systemd import SystemdNotifier as SystemdNotifier

__all__ = [
    "Autoreloader",
    "ControlSocket",
    "DropPrivileges",
    "LineReady",
    "Monitor",
    "MonitorStatistics",
    "PIDFile",
    "PIDFileFolderWarning",
    "PIDFileLockedError",
    "PortReady",
    "SignalHandler",
    "Subprocess",
    "SystemdNotifier",
]
