"""The environment a child process gets: this process's, without what speaks for the service to systemd.

``NOTIFY_SOCKET`` lets a process tell systemd that the service is ready, reloading or
stopping (with ``NotifyAccess=all``, any process of the service may); ``WATCHDOG_USEC``
and ``WATCHDOG_PID`` ask it to feed the watchdog. They are meant for the service's main
process only, so programs and child brokers do not inherit them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: The variables of systemd's notification protocol, meant for the service's main process.
SYSTEMD_NOTIFY_VARIABLES = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})


def child_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: ``env`` as it is if given, else this process's without
    ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

    A child that should speak to systemd is given those variables explicitly, in ``env``.
    """
    if env is not None:
        return dict(env)
    return {name: value for name, value in os.environ.items() if name not in SYSTEMD_NOTIFY_VARIABLES}
