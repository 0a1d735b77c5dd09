"""restart(): block() re-executes the real process with its original arguments."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aiobus._reexec import reexec_argv

SERVICE = textwrap.dedent(
    """
    import os, sys
    import anyio
    from aiobus import Bus

    async def main() -> None:
        async with Bus() as bus:
            bus.unsubscribe("log", __import__("aiobus").log_to_structlog)
            await bus.start()
            if "AIOBUS_TEST_RUN" not in os.environ:
                os.environ["AIOBUS_TEST_RUN"] = "1"
                leaked_r, leaked_w = os.pipe()
                os.set_inheritable(leaked_w, True)
                os.environ["AIOBUS_TEST_FD"] = str(leaked_w)
                sys.stdout.write(f"first {sys.argv[1:]}\\n")
                await bus.restart()
            else:
                fd = int(os.environ["AIOBUS_TEST_FD"])
                fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
                sys.stdout.write(f"second {sys.argv[1:]} fd_open={fd in fds}\\n")
                await bus.exit()
            await bus.block()

    if __name__ == "__main__":
        anyio.run(main)
    """
)


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOBUS_TEST")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd (Linux)")
def test_restart_reexecutes_a_script_with_its_arguments(tmp_path: Path) -> None:
    """A script restarted by the bus runs again with the same arguments and no inherited fds."""
    (tmp_path / "service.py").write_text(SERVICE)
    result = run([sys.executable, "service.py", "--port", "8080"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "first ['--port', '8080']",
        "second ['--port', '8080'] fd_open=False",
    ]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd (Linux)")
def test_restart_reexecutes_python_dash_m(tmp_path: Path) -> None:
    """A package run with ``python -m`` restarts as ``python -m`` again."""
    package = tmp_path / "svcpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(SERVICE)
    result = run([sys.executable, "-m", "svcpkg", "x"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["first ['x']", "second ['x'] fd_open=False"]


def test_reexec_argv_keeps_interpreter_options() -> None:
    """The re-exec arguments are the interpreter's original ones, options included."""
    assert reexec_argv() == sys.orig_argv
