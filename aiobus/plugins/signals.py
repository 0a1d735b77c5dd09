"""SignalHandler: turn the process's signals into bus transitions, on anyio's signal receiver."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from aiobus import Bus, ExitCode, Priority, State

Handler = str | Callable[..., Any]
SignalSpec = str | int | signal.Signals

#: Channel names that run the bus's transition of that name rather than a bare publish.
TRANSITIONS = ("start", "stop", "graceful", "exit", "restart")
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}
#: What a signal handled by a transition does, as its log line says it: ``Caught SIGUSR1: graceful``.
_DOING = {"start": "starting", "stop": "stopping", "graceful": "graceful", "exit": "exiting", "restart": "restarting"}


def parse_signal(spec: SignalSpec) -> signal.Signals:
    """A signal from its name (``"SIGTERM"`` or ``"TERM"``) or number.

    Raises:
        ValueError: an unknown signal, or one that cannot be caught.
    """
    try:
        if isinstance(spec, str):
            name = spec.upper()
            sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        else:
            sig = signal.Signals(spec)
    except (KeyError, ValueError):
        raise ValueError(f"unknown signal {spec!r}") from None
    if sig in _UNCATCHABLE:
        raise ValueError(f"{sig.name} cannot be caught")
    return sig


def has_controlling_terminal() -> bool:
    """Whether this process has a controlling terminal (it is not a service or daemon)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


class SignalHandler:
    """Signals drive the bus: by default SIGTERM and SIGINT exit, SIGHUP restarts, SIGUSR1 is graceful.

    - SIGTERM, SIGINT: exit. The process then ends with the bus's exit code (0 after
      a clean shutdown) when the application returns ``bus.exit_code`` from its main,
      as the README shows.
    - A second SIGINT while the bus is shutting down forces it: what remains of the
      shutdown is cancelled and the exit code is 130.
    - SIGHUP: restart when the process has no controlling terminal (a service or a
      daemon), exit when it has one. The terminal is looked up at construction: on
      a real hang-up the kernel detaches it before the signal is read.
    - SIGUSR1: graceful.

    ``handlers`` maps signals (names such as ``"SIGTERM"``, or numbers) to a channel
    name or a callable, and overrides the defaults signal by signal (``None`` removes
    one). ``"start"``, ``"stop"``, ``"graceful"``, ``"exit"`` and ``"restart"`` run the
    bus's transition of that name; any other name is published on the bus. A
    callable is called with the signal number if it takes an argument, else with
    none, and awaited if it returns an awaitable. Handlers run in tasks of their own,
    so signals keep being read while an exit runs. Every caught signal is logged with
    what it does: ``Caught SIGUSR1: graceful``, ``Caught SIGHUP: restarting (no
    controlling terminal)``, ``Caught SIGUSR2: publishing orders``.

    Signals are received from :meth:`subscribe` (or from the bus's start, if the bus
    was not yet entered) until the bus's tasks end or :meth:`unsubscribe`; then the
    handlers that were in place before are put back (anyio alone would reset them to
    the default, anyio#689).

    Raises:
        ValueError: an unknown signal name, or an uncatchable signal.
        TypeError: a handler that is neither a channel name nor callable.
    """

    def __init__(self, bus: Bus, handlers: Mapping[SignalSpec, Handler | None] | None = None) -> None:
        self.bus = bus
        self.has_terminal = has_controlling_terminal()
        table: dict[signal.Signals, Handler | None] = {
            signal.SIGTERM: "exit",
            signal.SIGINT: "exit",
            signal.SIGHUP: "exit" if self.has_terminal else "restart",
            signal.SIGUSR1: "graceful",
        }
        for spec, handler in (handlers or {}).items():
            if handler is not None and not isinstance(handler, str) and not callable(handler):
                raise TypeError(f"the handler of {spec!r} must be a channel name or callable, not {handler!r}")
            table[parse_signal(spec)] = handler
        self.handlers: dict[signal.Signals, Handler] = {sig: h for sig, h in table.items() if h is not None}
        #: Why a default handler was chosen, said in the log line of its signal.
        self._why: dict[signal.Signals, str] = {}
        if not any(parse_signal(spec) is signal.SIGHUP for spec in handlers or {}):
            self._why[signal.SIGHUP] = "a terminal controls it" if self.has_terminal else "no controlling terminal"
        self._scope: anyio.CancelScope | None = None
        self._restored = anyio.Event()
        self._restored.set()
        self._exiting = False

    # -- attaching --------------------------------------------------------------------

    def subscribe(self) -> None:
        """Start receiving the signals now if the bus has been entered, else at its start."""
        self.bus.subscribe("start", self._start_receiving, priority=Priority.START_SIGNALS)
        try:
            self._start_receiving()
        except RuntimeError:
            pass  # the bus is not entered yet: its start will do it

    def unsubscribe(self) -> None:
        """Stop receiving; the previous handlers are back once :meth:`wait_restored` returns."""
        self.bus.unsubscribe("start", self._start_receiving)
        if self._scope is not None:
            self._scope.cancel()

    async def wait_restored(self) -> None:
        """Wait until the signals are no longer received here and the previous handlers are back.

        Cancelled: nothing changes. No timeout (wrap it in ``anyio.fail_after``).
        """
        await self._restored.wait()

    def _start_receiving(self) -> None:
        if self._scope is None:
            self._scope = anyio.CancelScope()
            self._restored = anyio.Event()
            try:
                self.bus.start_soon(self._receive, self._scope, name="aiobus signal receiver")
            except RuntimeError:
                self._scope = None
                self._restored.set()
                raise

    # -- receiving --------------------------------------------------------------------

    async def _receive(self, scope: anyio.CancelScope) -> None:
        signals = tuple(self.handlers)
        previous = _PreviousHandlers(signals)
        try:
            with scope, anyio.open_signal_receiver(*signals) as received:
                self.bus.log("Receiving signals", signals=[sig.name for sig in signals])
                async for signum in received:
                    self._dispatch(signal.Signals(signum))
        finally:
            previous.restore()
            self._scope = None
            self._restored.set()

    def _dispatch(self, sig: signal.Signals) -> None:
        shutting_down = self._exiting or self.bus.state in (State.STOPPING, State.EXITING)
        if sig is signal.SIGINT and shutting_down:
            self.bus.log("Caught a second SIGINT: forcing the shutdown", logging.WARNING, signal=sig.name)
            self.bus.force_exit(ExitCode.FORCED)
            return
        handler = self.handlers[sig]
        action = handler if isinstance(handler, str) else getattr(handler, "__qualname__", repr(handler))
        if not isinstance(handler, str):
            doing = f"calling {action}"
        else:
            doing = _DOING.get(handler, f"publishing {handler}")
        if sig in self._why:
            doing += f" ({self._why[sig]})"
        self.bus.log(f"Caught {sig.name}: {doing}", signal=sig.name, action=action)
        if handler in ("exit", "restart"):
            self._exiting = True
        self.bus.start_soon(self._run_handler, handler, sig, name=f"aiobus {sig.name} handler")

    async def _run_handler(self, handler: Handler, sig: signal.Signals) -> None:
        try:
            if isinstance(handler, str):
                if handler in TRANSITIONS:
                    await getattr(self.bus, handler)()
                else:
                    await self.bus.publish(handler)
            else:
                result = handler(sig) if _takes_an_argument(handler) else handler()
                if inspect.isawaitable(result):
                    await result
        except Exception:
            self.bus.log(f"The {sig.name} handler failed", logging.ERROR, traceback=True, signal=sig.name)


def _takes_an_argument(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional or p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)


class _PreviousHandlers:
    """The handlers of some signals as they were, to be put back later.

    On asyncio, a handler set with ``loop.add_signal_handler`` shows as a no-op at
    the ``signal`` level, so the loop's own table is read (a private attribute,
    looked up defensively) and the handler re-added there.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self._python = {sig: signal.getsignal(sig) for sig in signals}
        self._loop_handlers: dict[signal.Signals, Any] = {}
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # trio: it puts the previous handlers back itself
            self._loop = None
        else:
            table = getattr(self._loop, "_signal_handlers", {})
            self._loop_handlers = {sig: table[sig] for sig in signals if sig in table}

    def restore(self) -> None:
        for sig, previous in self._python.items():
            handle = self._loop_handlers.get(sig)
            if handle is not None and self._loop is not None:
                self._loop.add_signal_handler(sig, handle._callback, *handle._args)
            elif previous is not None:
                signal.signal(sig, previous)
