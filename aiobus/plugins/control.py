"""ControlSocket: operate a running service through a Unix socket (``aiobus ctl``).

The socket is created mode 0600 (bound, made 0600, only then listening), in a folder
made 0700 when the plugin creates it. Each peer's uid is read with ``SO_PEERCRED``: the
service's own (effective) user and root are served, anyone else gets an error reply and
a log line. A socket file left by a dead service is replaced (with a warning); one a live
service listens on makes the start fail, naming it. Nothing read from the socket is ever
unpickled: requests are JSON lines (``_control_protocol``), at most 64 KiB each.

The bus is never blocked by a client: each runs in a task of its own, a reply not taken
within :data:`SEND_TIMEOUT` seconds cuts the connection, and log events reach ``tail``
clients through a bounded buffer each, filled without waiting: a client whose buffer is
full is cut, and the drop logged.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from aiobus import Bus, Child, ChildInfo, Priority, SimplePlugin, State, Supervisor, priority

from ._control_protocol import (
    MAX_REQUEST,
    VERSION,
    ErrorCode,
    Request,
    RequestError,
    error_reply,
    level_name,
    ok_reply,
    parse_level,
    parse_request,
    parse_signal,
)
from ._control_wire import SEND_TIMEOUT, TOO_LARGE, LineReader, peer, send

__all__ = ["ControlSocket"]

#: Log events that may wait for a tail client before it is cut.
TAIL_BUFFER: Final = 1000
#: Clients served at once; one more gets an error reply.
MAX_CLIENTS: Final = 256
#: Seconds the exit leaves requests under way (the reply to ``exit`` among them) to finish.
EXIT_GRACE: Final = 2.0
#: The longest path a Unix socket may have, in bytes (Linux: 108, with the final NUL).
MAX_PATH: Final = 107


@dataclass(eq=False)
class _Tail:
    """A tail client: what it follows, and the buffer of events waiting for it."""

    name: str | None
    level: int | None  # None: the log's level
    send: MemoryObjectSendStream[dict[str, Any]]
    receive: MemoryObjectReceiveStream[dict[str, Any]]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    dropped: bool = False


class ControlSocket(SimplePlugin):
    """A Unix socket through which an operator steers the running service (``aiobus ctl``).

    It binds at the bus's start (``Priority.START_BIND``, 75: as root if the service drops
    privileges at 77, before the children start, so that ``status`` answers while they
    start) and closes at its exit, once the replies under way (at most
    :data:`EXIT_GRACE` s) are sent; the socket file is removed then.

    Args:
        bus: the bus.
        path: the socket's path (at most 107 bytes); its folder is created (0700) if missing.
        set_level: called with a level number on ``log-level`` (the ``aiobus`` command passes
            one that reconfigures its logging); without it, ``log-level`` replies that it
            cannot. ``tail`` sends the events at or above the current level either way.
        level: the log's level when the service starts (for ``tail``).

    Raises:
        TypeError, ValueError: the path is not a path, or too long.
    """

    def __init__(
        self,
        bus: Bus,
        path: str | os.PathLike[str],
        *,
        set_level: Callable[[int], None] | None = None,
        level: int = logging.INFO,
    ) -> None:
        super().__init__(bus)
        self.path = os.path.abspath(os.fspath(path))
        if len(os.fsencode(self.path)) > MAX_PATH:
            raise ValueError(f"the control socket's path is longer than {MAX_PATH} bytes: {self.path}")
        self.set_level = set_level
        self.level = level
        self._socket: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # the socket file's (device, inode)
        self._started: float | None = None
        self._serving: anyio.CancelScope | None = None
        self._clients: dict[anyio.CancelScope, int] = {}  # each client's scope -> requests under way
        self._idle: anyio.Event | None = None  # set when no request is under way, at exit
        self._tails: set[_Tail] = set()
        self._closing = False

    # -- the bus's channels -------------------------------------------------------------

    @priority(Priority.START_BIND)
    async def start(self) -> None:
        """Create the socket and serve it.

        Raises:
            RuntimeError: a live service listens on the path.
            OSError: the folder or the socket cannot be made, or something that is not a
                socket is in the way.
        """
        if self._socket is not None:
            return
        self._socket = await anyio.to_thread.run_sync(self._bind)
        info = os.stat(self.path)
        self._identity = (info.st_dev, info.st_ino)
        self._started = time.monotonic()
        self._closing = False
        self._serving = anyio.CancelScope()
        self.bus.subscribe("log", self._on_log)
        self.bus.start_soon(self._serve, self._socket, name="aiobus control socket")
        self.bus.log(f"Control socket listening at {self.path}", path=self.path)

    async def exit(self) -> None:
        """Stop accepting, remove the socket file, let the replies under way go (at most
        EXIT_GRACE s), then cut every client. Cancelled: the clients are cut at once."""
        if self._socket is None:
            return
        self._closing = True
        if self._serving is not None:
            self._serving.cancel()
        self._unlink()
        self._socket = None
        try:
            with anyio.move_on_after(EXIT_GRACE):
                while any(self._clients.values()):
                    self._idle = anyio.Event()
                    await self._idle.wait()
        finally:
            for scope in list(self._clients):
                scope.cancel()
            self.bus.unsubscribe("log", self._on_log)

    # -- the socket ---------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        """Make the folder (0700) if missing, clear a stale socket, bind (0600) and listen (in a thread)."""
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o700)
            os.chmod(folder, 0o700)
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(info.st_mode):
                raise FileExistsError(errno.EEXIST, f"{self.path} exists and is not a socket: not replaced")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(2)
            try:
                probe.connect(self.path)
            except (ConnectionRefusedError, FileNotFoundError):
                self.bus.log(
                    f"Replacing the stale control socket {self.path} (nothing listens on it)",
                    logging.WARNING,
                    path=self.path,
                )
                os.unlink(self.path)
            except TimeoutError:
                raise RuntimeError(
                    f"a service listens on the control socket {self.path} (it does not answer)"
                ) from None
            else:
                raise RuntimeError(f"another service is listening on the control socket {self.path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)  # not listening yet: a connection now is refused, whatever the umask
            os.chmod(self.path, 0o600)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _unlink(self) -> None:
        """Remove the socket file, if it is still ours."""
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as error:
            self.bus.log(f"Could not remove the control socket {self.path}: {error}", logging.WARNING, path=self.path)

    async def _serve(self, sock: socket.socket) -> None:
        assert self._serving is not None
        try:
            async with anyio.create_task_group() as group:
                with self._serving:
                    while True:
                        await anyio.wait_readable(sock)
                        try:
                            conn, _ = sock.accept()
                        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                            continue
                        except OSError as error:  # EMFILE and the like: wait a little, serve the others
                            self.bus.log(f"Control socket: accept failed: {error}", logging.ERROR, path=self.path)
                            await anyio.sleep(0.5)
                            continue
                        conn.setblocking(False)
                        scope = anyio.CancelScope()
                        self._clients[scope] = 0
                        group.start_soon(self._client, conn, scope)
        finally:
            sock.close()

    # -- one client ---------------------------------------------------------------------

    async def _client(self, conn: socket.socket, scope: anyio.CancelScope) -> None:
        pid = uid = -1
        try:
            with scope:
                pid, uid = peer(conn)
                if uid not in (0, os.geteuid()):
                    self.bus.log(
                        f"Control socket: refused a client of uid {uid} (pid {pid}): only uid {os.geteuid()} "
                        f"and root may steer this service",
                        logging.WARNING,
                        peer_uid=uid,
                        peer_pid=pid,
                    )
                    refusal = RequestError(ErrorCode.REFUSED, f"uid {uid} may not steer this service")
                    await send(conn, error_reply(refusal))
                    return
                if len(self._clients) > MAX_CLIENTS:
                    refusal = RequestError(ErrorCode.REFUSED, f"too many clients (at most {MAX_CLIENTS} at once)")
                    await send(conn, error_reply(refusal))
                    return
                lines = LineReader(conn)
                while True:
                    line = await lines.next()
                    if line is None:
                        return
                    self._clients[scope] += 1
                    try:
                        if line is TOO_LARGE:
                            too_large = RequestError(ErrorCode.TOO_LARGE, f"a request is at most {MAX_REQUEST} bytes")
                            await send(conn, error_reply(too_large))
                            continue
                        assert isinstance(line, bytes)
                        tail = await self._request(conn, line, uid)
                    finally:
                        self._clients[scope] -= 1
                        if self._closing and self._idle is not None and not any(self._clients.values()):
                            self._idle.set()
                    if tail is not None:
                        await self._follow(conn, lines, tail)
                        return
        except TimeoutError:
            self.bus.log(
                f"Control socket: a client (uid {uid}, pid {pid}) took no reply within {SEND_TIMEOUT:g} s: cut",
                logging.WARNING,
                peer_uid=uid,
                peer_pid=pid,
            )
        except OSError:
            pass  # the client went away
        finally:
            del self._clients[scope]
            conn.close()

    async def _request(self, conn: socket.socket, line: bytes, uid: int) -> _Tail | None:
        """Do one request and send its reply; return the tail to follow, for ``tail``."""
        request_id = None
        try:
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as error:
                raise RequestError(ErrorCode.BAD_REQUEST, f"the request is not JSON: {error}"[:300]) from None
            request = parse_request(obj)
            request_id = request.id
            if request.command.name == "tail":
                tail = self._open_tail(request)
                level = self.level if tail.level is None else tail.level
                try:
                    await send(conn, ok_reply({"tail": tail.name, "level": level_name(level)}, request_id))
                except BaseException:
                    self._close_tail(tail)
                    raise
                return tail
            result = await self._do(request, uid)
        except RequestError as error:
            await send(conn, error_reply(error, request_id))
            return None
        except Exception as error:  # a bug here must not end the service: the client hears of it
            self.bus.log("Control socket: a request failed", logging.ERROR, traceback=True)
            failure = RequestError(ErrorCode.FAILED, f"the request failed: {type(error).__name__}: {error}")
            await send(conn, error_reply(failure, request_id))
            return None
        await send(conn, ok_reply(result, request_id))
        return None

    async def _do(self, request: Request, uid: int) -> dict[str, Any]:
        name = request.command.name
        args = request.args
        if name == "status":
            return self._status()
        self.bus.log(f"Control: {name} {' '.join(args.values())}".rstrip(), command=name, args=args, peer_uid=uid)
        if name in ("start", "stop", "restart"):
            supervisor, members = self._find(args["name"])
            if self.bus.state is not State.STARTED:
                raise RequestError(ErrorCode.FAILED, f"{name} {args['name']}: the bus is {self.bus.state.name}")
            try:
                infos = await _steer(supervisor, name, members)
            except Exception as error:
                reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                raise RequestError(ErrorCode.FAILED, f"{name} {args['name']}: {reason}") from None
            if len(members) == 1 and members[0].name == args["name"]:
                return {"child": _child(infos[0])}
            return {"pool": args["name"], "children": [_child(info) for info in infos]}
        if name == "signal":
            sig = parse_signal(args["signal"])
            _, members = self._find(args["name"])
            pids = []
            for child in members:
                try:
                    child.send_signal(sig)
                except ProcessLookupError:
                    raise RequestError(ErrorCode.FAILED, f"child {child.name!r} is not running") from None
                except OSError as error:
                    raise RequestError(ErrorCode.FAILED, f"{sig.name} to {child.name!r}: {error}") from None
                pids.append(child.pid)
            return {"name": args["name"], "pid": pids[0] if len(pids) == 1 else pids, "signal": sig.name}
        if name == "graceful":
            try:
                await self.bus.graceful()
            except Exception as error:
                raise RequestError(ErrorCode.FAILED, f"graceful: {error}") from None
            return {"state": self.bus.state.name}
        if name == "exit":
            if self.bus.state is not State.EXITING:
                self.bus.start_soon(self.bus.exit, name="aiobus control exit")
            await self.bus.wait(State.EXITING)
            return {"state": State.EXITING.name}
        if name == "log-level":
            level = parse_level(args["level"])
            if self.set_level is None:
                raise RequestError(ErrorCode.FAILED, "this service's log level cannot be changed (no set_level)")
            previous, self.level = self.level, level
            self.set_level(level)
            return {"level": level_name(level), "previous": level_name(previous)}
        raise AssertionError(f"command {name!r} not handled")  # pragma: no cover - COMMANDS and this agree

    def _status(self) -> dict[str, Any]:
        started = self._started
        return {
            "state": self.bus.state.name,
            "pid": os.getpid(),
            "uptime": None if started is None else time.monotonic() - started,
            "children": [_child(info) for supervisor in _supervisors(self.bus) for info in supervisor.children()],
        }

    def _find(self, name: str) -> tuple[Supervisor, list[Child]]:
        """The child named ``name``, or the members of the pool named so (a ChildBroker with workers, a
        Subprocess with instances), and their supervisor."""
        known: list[str] = []
        for supervisor in _supervisors(self.bus):
            children = [supervisor[info.name] for info in supervisor.children()]
            for child in children:
                if child.name == name:
                    return supervisor, [child]
            members = [child for child in children if getattr(child.batch, "name", None) == name]
            if members:
                return supervisor, members
            for child in children:
                pool = getattr(child.batch, "name", None)
                known += [child.name] if pool is None or pool in known else [pool, child.name]
        raise RequestError(
            ErrorCode.UNKNOWN_CHILD, f"no child named {name!r}; the children are: {', '.join(known) or 'none'}"
        )

    # -- tail ---------------------------------------------------------------------------

    def _open_tail(self, request: Request) -> _Tail:
        name = request.args.get("name")
        if name is not None:
            self._find(name)
        level = parse_level(request.args["level"]) if "level" in request.args else None
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](TAIL_BUFFER)
        tail = _Tail(name, level, send, receive)
        self._tails.add(tail)
        return tail

    def _on_log(self, msg: str, level: int, **fields: Any) -> None:
        """The ``log`` listener: hand the event to each tail client that wants it, without waiting."""
        if not self._tails:
            return
        event: dict[str, Any] | None = None
        for tail in list(self._tails):
            if level < (self.level if tail.level is None else tail.level):
                continue
            if tail.name is not None and not _about(tail.name, fields):
                continue
            if event is None:
                event = {"time": time.time(), "level": level_name(level), "message": msg, "fields": fields}
            try:
                tail.send.send_nowait(event)
            except anyio.WouldBlock:
                tail.dropped = True
                self._tails.discard(tail)
                tail.scope.cancel()  # its task logs the drop: a log listener must not log
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._tails.discard(tail)

    def _close_tail(self, tail: _Tail) -> None:
        self._tails.discard(tail)
        tail.send.close()
        tail.receive.close()

    async def _follow(self, conn: socket.socket, lines: LineReader, tail: _Tail) -> None:
        """Send the tail's events until the client goes, or is cut for not reading."""
        receive = tail.receive
        try:
            with tail.scope:
                async with anyio.create_task_group() as group:

                    async def until_gone() -> None:
                        while await lines.next() is not None:
                            pass  # a tail client has nothing more to say
                        group.cancel_scope.cancel()

                    group.start_soon(until_gone)
                    async for event in receive:
                        await send(conn, {"v": VERSION, "event": event})
        except TimeoutError:
            tail.dropped = True
        finally:
            self._close_tail(tail)
        if tail.dropped:
            self.bus.log(
                f"Control socket: a tail client did not keep up (over {TAIL_BUFFER} events behind, or no read "
                f"within {SEND_TIMEOUT:g} s): its stream is cut",
                logging.WARNING,
                buffer=TAIL_BUFFER,
            )


async def _steer(supervisor: Supervisor, command: str, members: list[Child]) -> list[ChildInfo]:
    """start, stop or restart a child, or a pool's members: started and stopped together, restarted
    one after another (each running again before the next stops), so that a pool keeps serving."""
    if command == "restart" or len(members) == 1:
        act = {"start": supervisor.start_child, "stop": supervisor.stop_child, "restart": supervisor.restart_child}
        return [await act[command](child) for child in members]
    infos: dict[str, ChildInfo] = {}
    failures: list[Exception] = []

    async def one(child: Child) -> None:
        try:
            infos[child.name] = await (supervisor.start_child if command == "start" else supervisor.stop_child)(child)
        except Exception as error:
            failures.append(error)

    async with anyio.create_task_group() as group:
        for child in members:
            group.start_soon(one, child)
    if failures:
        raise failures[0]
    return [infos[child.name] for child in members]


def _about(name: str, fields: dict[str, Any]) -> bool:
    """Whether a log event is about the child (or the pool's member) named ``name``."""
    value = fields.get("child")
    return isinstance(value, str) and (value == name or value.startswith(name + "["))


def _supervisors(bus: Bus) -> list[Supervisor]:
    """The supervisors subscribed to the bus, in start order (the default one among them, once made)."""
    found: list[Supervisor] = []
    for callback in bus.listeners.get("start", ()):
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, Supervisor) and owner not in found:
            found.append(owner)
    return found


def _child(info: ChildInfo) -> dict[str, Any]:
    last = info.last_exit
    return {
        "name": info.name,
        "kind": info.kind,
        "state": str(info.state),
        "pid": info.pid,
        "uptime": info.uptime,
        "restarts": info.restarts,
        "last_exit": None
        if last is None
        else {
            "pid": last.pid,
            "exit_code": last.exit_code,
            "signal": last.signal,
            "reason": last.reason,
            "expected": last.expected,
            "failed": last.failed,
        },
    }
