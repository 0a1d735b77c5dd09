"""Shutdown: from SIGTERM until ``block()`` returns, and until every child is reaped, against CherryPy.

    python bench/bench_shutdown.py [--runs N] [--children-runs M] [--children C]

Each service is a real process (``bench/_shutdown_service.py``), started afresh for each run.
Once it says it is started, and after a random pause of 50 to 250 ms (so that the signal comes
at a random phase of CherryPy's 0.1 s poll), the time is taken (``time.monotonic()``, system-wide
on Linux) just before ``os.kill(pid, SIGTERM)``; the service prints the same clock right after
its ``block()`` returned, and the process's exit is seen at once through a pidfd. The exit
includes the interpreter's own finalization (more modules loaded, longer). The services:

- aiobus: ``Bus`` + ``SignalHandler``, no children (target: p50 under 5 ms);
- cherrypy (the baseline): ``wspbus.Bus`` + its ``SignalHandler`` plugin; its ``block()`` polls
  every 0.1 s (skipped if CherryPy is not installed);
- aiobus with C child brokers and C programs (8 each by default): until ``block()`` returns (every
  child stopped and reaped), and until the parent process has exited; then every process that
  was below it before the SIGTERM must be gone;
- plain parent (its baseline): no bus, 2C sleeping Python children that it terminates and reaps
  one after another on SIGTERM.

The services take turns, run after run, so a noisy neighbour slows them alike. The table gives
p50, p90 and max in milliseconds, and the ratio of each p50 to its baseline's p50.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from _common import descendants, is_running, kill_all, percentile, verdict, write_table

SERVICE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shutdown_service.py")
TIMEOUT = 60.0  # seconds for any one step before the run counts as failed


@dataclass
class Figures:
    start: list[float] = field(default_factory=list)  # spawn until "ready"
    block: list[float] = field(default_factory=list)  # SIGTERM until block() returned
    exit: list[float] = field(default_factory=list)  # SIGTERM until the process exited
    tree: list[int] = field(default_factory=list)  # processes below the service before the SIGTERM
    left: list[int] = field(default_factory=list)  # of those, still running after its exit
    failures: list[str] = field(default_factory=list)


class Service:
    """One service process, with its standard output read line by line."""

    def __init__(self, kind: str, children: int, log: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, SERVICE, kind, str(children)], stdout=subprocess.PIPE, stderr=log, start_new_session=True
        )
        assert self.process.stdout is not None
        self.fd = self.process.stdout.fileno()
        self.buffer = b""

    def line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError(f"no line from the service within {timeout:g} s")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise EOFError(f"the service ended (code {self.process.wait()}) without saying more")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def wait_exit(self, timeout: float) -> float:
        """Wait for the process to end; the monotonic time it was seen ending."""
        fd = os.pidfd_open(self.process.pid)
        try:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError(f"the service did not exit within {timeout:g} s")
            seen = time.monotonic()
        finally:
            os.close(fd)
        self.process.wait()
        return seen

    def cleanup(self) -> None:
        """Kill whatever is left of the service and below it."""
        if self.process.poll() is None:
            kill_all([*descendants(self.process.pid), self.process.pid])
            self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


def one_run(kind: str, children: int, figures: Figures) -> None:
    with tempfile.TemporaryFile() as log:
        spawned = time.monotonic()
        service = Service(kind, children, log.fileno())
        tree: list[int] = []
        try:
            if service.line(TIMEOUT) != "ready":
                raise RuntimeError("the service did not say ready")
            figures.start.append(time.monotonic() - spawned)
            tree = descendants(service.process.pid)
            time.sleep(random.uniform(0.05, 0.25))  # CherryPy polls every 0.1 s: a random phase
            sent = time.monotonic()
            os.kill(service.process.pid, signal.SIGTERM)
            word, stamp = service.line(TIMEOUT).split()
            exited = service.wait_exit(TIMEOUT)
            if word != "blocked" or service.process.returncode != 0:
                raise RuntimeError(f"the service said {word!r} and exited with {service.process.returncode}")
            figures.block.append(float(stamp) - sent)
            figures.exit.append(exited - sent)
            figures.tree.append(len(tree))
            figures.left.append(sum(1 for pid in tree if is_running(pid)))
        except Exception as error:
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace")
            figures.failures.append(f"{kind}: {error!r}\n{tail}")
        finally:
            service.cleanup()
            kill_all(pid for pid in tree if is_running(pid))


def cherrypy_installed() -> bool:
    try:
        import cherrypy.process.wspbus  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each service without children")
    parser.add_argument("--children-runs", type=int, default=5, help="runs of each service with children")
    parser.add_argument("--children", type=int, default=8, help="child brokers and programs (C of each)")
    args = parser.parse_args()
    c = args.children
    plans = {
        "aiobus, no children": ("aiobus", 0, args.runs),
        "cherrypy wspbus (baseline)": ("cherrypy", 0, args.runs if cherrypy_installed() else 0),
        f"aiobus, {c} brokers + {c} programs": ("aiobus", c, args.children_runs),
        f"plain parent, {2 * c} children (baseline)": ("plain", c, args.children_runs),
    }
    results = {name: Figures() for name in plans}
    for round_ in range(max(runs for _, _, runs in plans.values())):
        for name, (kind, children, runs) in plans.items():
            if round_ < runs:
                one_run(kind, children, results[name])

    ms = 1e3
    rows: list[list[object]] = []
    baselines = {
        "aiobus, no children": "cherrypy wspbus (baseline)",
        "cherrypy wspbus (baseline)": "cherrypy wspbus (baseline)",
    }

    def p50(name: str, attribute: str) -> float | None:
        values: list[float] = getattr(results[name], attribute)
        return percentile(values, 0.5) if values else None

    for name, figures in results.items():
        base_name = baselines.get(name, f"plain parent, {2 * c} children (baseline)")
        for label, attribute in (("SIGTERM -> block() returns", "block"), ("SIGTERM -> process exit", "exit")):
            values: list[float] = getattr(figures, attribute)
            if not values:
                rows.append([f"{name}: {label}", 0, "skipped", "", "", "", ""])
                continue
            base = p50(base_name, attribute)
            ratio = percentile(values, 0.5) / base if base else "-"
            rows.append(
                [
                    f"{name}: {label}",
                    len(values),
                    percentile(values, 0.5) * ms,
                    percentile(values, 0.9) * ms,
                    max(values) * ms,
                    ratio,
                    f"{percentile(figures.start, 0.5):.2f} s",
                ]
            )
    write_table(["service: what", "runs", "p50 ms", "p90 ms", "max ms", "p50 ratio", "start p50"], rows)

    aio = p50("aiobus, no children", "block")
    if aio is not None:
        sys.stdout.write(f"target: SIGTERM until block() returns, no children, p50 under 5 ms: {aio * ms:.2f} ms")
        sys.stdout.write(f" ({verdict(aio < 0.005)})\n")
        cherry = p50("cherrypy wspbus (baseline)", "block")
        if cherry is not None:
            sys.stdout.write(f"        CherryPy's p50 in this run: {cherry * ms:.2f} ms ({cherry / aio:.1f}x aiobus)\n")
    with_children = results[f"aiobus, {c} brokers + {c} programs"]
    if with_children.exit:
        tree, left = max(with_children.tree), sum(with_children.left)
        sys.stdout.write(
            f"target: with {c} brokers + {c} programs, every child reaped by the parent's exit: "
            f"{tree} processes below it, {left} left over all runs ({verdict(left == 0)})\n"
        )
    failures = [failure for figures in results.values() for failure in figures.failures]
    for failure in failures:
        sys.stdout.write(f"FAILED run: {failure}\n")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
