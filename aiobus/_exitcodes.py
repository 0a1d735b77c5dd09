"""The exit codes of an aiobus process and of the processes it starts, in one place.

Where one fits, the number is the one BSD's ``sysexits.h`` gives (``EX_SOFTWARE``);
a bad command line is 2, as with argparse and the shells; a shutdown forced by a
second Ctrl-C is 130, as a shell reports a process ended by SIGINT (128 + 2).
"""

from __future__ import annotations

from typing import Final


class ExitCode:
    """The exit codes aiobus gives: ``bus.exit_code``, the ``aiobus`` command's, a daemon's launcher's."""

    #: A clean shutdown; the daemon reported that it started.
    OK: Final = 0
    #: The daemon did not start (its launcher's code), or a child broker's worker could not go on.
    FAILURE: Final = 1
    #: The ``aiobus`` command: a bad flag, or a target that cannot be loaded.
    USAGE: Final = 2
    #: ``aiobus ctl``: nothing listens at the control socket, the service is not running (LSB's ``status``).
    NOT_RUNNING: Final = 3
    #: A listener or a task of the bus failed, timed out, or supervision gave up (``EX_SOFTWARE``).
    SOFTWARE: Final = 70
    #: The shutdown was forced by a second Ctrl-C (or ``bus.force_exit``): 128 + SIGINT.
    FORCED: Final = 130
