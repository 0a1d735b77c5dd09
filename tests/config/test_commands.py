"""Services from files, run for real: ``python -m aiobus run --config/--procfile`` and ``aiobus check``."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from processes import Child, Spawner

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "examples" / "file_service"
WAIT = 60  # seconds: a generous bound on waits that normally take a second or two
PYTHON = json.dumps(sys.executable)  # a TOML string naming this interpreter


def aiobus(spawn: Spawner, *args: str, env: dict[str, str] | None = None) -> Child:
    return spawn.run([sys.executable, "-m", "aiobus", *args], env=env)


def write(spawn: Spawner, name: str, text: str) -> str:
    (spawn.directory / name).write_text(text)
    return name


def python3_on_path(spawn: Spawner) -> dict[str, str]:
    """An environment whose ``python3`` is this interpreter (the README's file runs ``python3``)."""
    folder = spawn.directory / "bin"
    folder.mkdir()
    (folder / "python3").symlink_to(sys.executable)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def readme_block(language: str) -> str:
    """The first ``language`` block of the README's "Services in a file" section."""
    section = (ROOT / "README.md").read_text().split("## Services in a file", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def stop_cleanly(child: Child) -> None:
    child.send(signal.SIGTERM)
    assert child.wait(WAIT) == 0, child.output
    child.assert_nothing_left()


class TestTheReadmeExample:
    def test_the_readme_shows_the_example_files_as_they_are(self) -> None:
        """The README's example is examples/file_service/aiobus.toml and jobs.py, word for word."""
        assert (EXAMPLE / "aiobus.toml").read_text() == readme_block("toml")
        assert (EXAMPLE / "jobs.py").read_text() == readme_block("python")

    @pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, /proc")
    def test_the_example_runs_serves_and_stops_cleanly_on_sigterm(self, spawn: Spawner) -> None:
        """The example file: its web program is ready and serves, its broker answers the setup's job, its
        PID file holds the pid; SIGTERM stops all with code 0, the PID file removed and nothing left."""
        for name in ("aiobus.toml", "jobs.py", "web.env"):
            shutil.copy(EXAMPLE / name, spawn.directory / name)
        child = aiobus(spawn, "run", "--config", "aiobus.toml", env=python3_on_path(spawn))
        child.wait_for('"job answered"', timeout=WAIT)
        assert (spawn.directory / "service.pid").read_text() == f"{child.pid}\n"
        ctl = aiobus(spawn, "ctl", "--socket", "control.sock", "status", "--json")
        assert ctl.wait(WAIT) == 0, ctl.output
        status = json.loads(ctl.output)
        assert ["web", "jobs[0]", "jobs[1]"] == [each["name"] for each in status["children"]], status
        events = child.events()
        [serving] = [event for event in events if event["event"].startswith("Serving HTTP")]
        port = re.search(r"port (\d+)", serving["event"])
        assert port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/", timeout=WAIT) as response:
            assert response.status == 200
        [answered] = [event for event in events if event["event"] == "job answered"]
        assert ["done", "warm the cache"] == answered["answer"]
        started = [event["child"] for event in events if event["event"].startswith("Child ") and "kind" in event]
        assert ["web", ["jobs[0]", "jobs[1]"]] == [started[0], sorted(started[1:])]  # the group's order
        stop_cleanly(child)
        assert not (spawn.directory / "service.pid").exists()

    def test_check_accepts_the_example(self, spawn: Spawner) -> None:
        """``aiobus check`` on the example: code 0 and a summary."""
        child = aiobus(spawn, "check", "--config", str(EXAMPLE / "aiobus.toml"))
        assert child.wait(WAIT) == 0, child.output
        assert child.lines == [f"{EXAMPLE / 'aiobus.toml'}: OK: 1 program, 1 broker, 1 group"]


ENV_PROGRAM = f"""
[service]
log_format = "json"

[programs.show]
argv = [{PYTHON}, "-c", "import os; print('env', os.environ['A'], os.environ['B'], os.environ['C'])"]
restart = "temporary"
env_file = "app.env"
env = {{ B = "from-env" }}
"""


REPORT = """
def setup(bus):
    bus.subscribe("start", lambda: bus.log("report", interval=bus.main_interval, stop_timeout=bus.stop_timeout))
"""


class TestRunning:
    def test_env_wins_over_env_file_which_wins_over_the_inherited_environment(self, spawn: Spawner) -> None:
        """A program sees its env's B, its env file's A (over the inherited A) and the inherited C."""
        write(spawn, "app.env", "A=from-file\nB=from-file\n")
        config = write(spawn, "env.toml", ENV_PROGRAM)
        child = aiobus(spawn, "run", "--config", config, env={"A": "inherited", "C": "inherited"})
        assert "env from-file from-env inherited" in child.wait_for("env from-", timeout=WAIT)
        stop_cleanly(child)

    def test_a_flag_given_wins_over_the_file_and_the_file_over_the_default(self, spawn: Spawner) -> None:
        """Flags given (even one equal to its default) win over the file; the file's pid_file is used."""
        write(spawn, "report.py", REPORT)
        config = write(
            spawn,
            "svc.toml",
            'setup = "report:setup"\n[service]\nmain_interval = 0.25\nstop_timeout = 3\npid_file = "svc.pid"\n'
            'log_format = "json"\n',
        )
        child = aiobus(spawn, "run", "--config", config, "--stop-timeout", "7.5", "--main-interval=0.1")
        child.wait_for('"Bus STARTED"', timeout=WAIT)
        assert (spawn.directory / "svc.pid").read_text() == f"{child.pid}\n"
        stop_cleanly(child)
        [report] = [event for event in child.events() if event["event"] == "report"]
        assert (0.1, 7.5) == (report["interval"], report["stop_timeout"])

    def test_with_reload_a_change_to_the_file_restarts_the_service_which_reads_it_again(self, spawn: Spawner) -> None:
        """reload = true: writing the service file re-executes the process, which runs with the new values."""
        write(spawn, "report.py", REPORT)
        text = 'setup = "report:setup"\n[service]\nreload = true\nmain_interval = 0.25\nlog_format = "json"\n'
        config = write(spawn, "svc.toml", text)
        child = aiobus(spawn, "run", "--config", config)
        child.wait_for("Autoreloader watching", timeout=WAIT)
        child.wait_for('"report"', timeout=WAIT)
        write(spawn, "svc.toml", text.replace("0.25", "0.5"))
        child.wait_for('"report"', timeout=WAIT, count=2)
        stop_cleanly(child)
        events = child.events()
        assert any(event["event"] == "Re-executing the process" for event in events)
        assert [0.25, 0.5] == [event["interval"] for event in events if event["event"] == "report"]

    def test_a_procfile_runs_its_three_programs_and_sigterm_stops_them(self, spawn: Spawner) -> None:
        """Each line of a Procfile is a program: all three run, SIGTERM stops them with code 0, nothing left."""
        lines = [
            f"{name}: {sys.executable} -c \"import time; print('{name} up'); time.sleep(600)\""
            for name in ("one", "two", "three")
        ]
        procfile = write(spawn, "Procfile", "# three programs\n\n" + "\n".join(lines) + "\n")
        child = aiobus(spawn, "run", "--procfile", procfile, "--log-format", "json")
        for name in ("one", "two", "three"):
            child.wait_for(f"{name} up", timeout=WAIT)
        child.wait_for('"Bus STARTED"', timeout=WAIT)
        stop_cleanly(child)
        ended = {event["child"] for event in child.events() if " ended: " in event["event"] and event.get("expected")}
        assert {"one", "two", "three"} == ended


# (a file's text, or None for no file, the problem expected); an env file app.env holds a bad line 2.
BAD_FILES = {
    "a missing file": (None, "svc.toml: no such file"),
    "a TOML syntax error": ("[service]\nmain_interval = \n", "svc.toml:2: invalid TOML: Invalid value (column 17)"),
    "an unknown key": (
        "[service]\nstop_timout = 3\n",
        "svc.toml: [service] stop_timout: unknown key (did you mean 'stop_timeout'?)",
    ),
    "an unknown table": ("[program.web]\ncommand = 'x'\n", "svc.toml: program: unknown key (did you mean 'programs'?)"),
    "a wrong type": (
        "[programs.web]\ncommand = 'x'\nready = { port = 'x' }\n",
        "svc.toml: [programs.web.ready] port: expected a TCP port or a template such as \"{port}\", got 'x'",
    ),
    "a missing required field": (
        "[brokers.jobs]\ngrace = 1\n",
        "svc.toml: [brokers.jobs]: missing required key 'target'",
    ),
    "a program without a command": (
        "[programs.web]\ncwd = '.'\n",
        "svc.toml: [programs.web]: missing required key 'command' (or 'argv')",
    ),
    "an unknown program in a group": (
        "[programs.web]\ncommand = 'x'\n[groups.g]\nchildren = ['wbe']\n",
        "svc.toml: [groups.g] children: no program or broker named 'wbe' (did you mean 'web'?)",
    ),
    "a bad signal name": (
        "[programs.web]\ncommand = 'x'\nstop_signal = 'SIGTREM'\n",
        "svc.toml: [programs.web] stop_signal: unknown signal 'SIGTREM' (did you mean 'SIGTERM'?)",
    ),
    "an env file line that does not parse": (
        "[programs.web]\ncommand = 'x'\nenv_file = 'app.env'\n",
        "app.env:2: expected KEY=VALUE (no '=' on the line) (the env_file of [programs.web])",
    ),
    "a target that is missing": (
        "[brokers.jobs]\ntarget = 'no_such_module:worker'\n",
        "svc.toml: [brokers.jobs] target: no module named 'no_such_module' (target 'no_such_module:worker')",
    ),
}


def bad_file(spawn: Spawner, case: str) -> str:
    text, _ = BAD_FILES[case]
    write(spawn, "app.env", "A=1\nSECRET VALUE\n")
    if text is not None:
        write(spawn, "svc.toml", text)
    return "svc.toml"


class TestBadInput:
    @pytest.mark.parametrize("command", ["check", "run"])
    @pytest.mark.parametrize("case", list(BAD_FILES))
    def test_a_bad_file_is_one_line_code_2_and_nothing_started(self, spawn: Spawner, command: str, case: str) -> None:
        """Each kind of bad input: one line naming the file and where, code 2, no traceback, nothing started."""
        child = aiobus(spawn, command, "--config", bad_file(spawn, case))
        assert child.wait(WAIT) == 2, child.output
        assert [f"aiobus: error: {BAD_FILES[case][1]}"] == child.lines
        assert "SECRET" not in child.output

    def test_check_reports_every_problem_at_once(self, spawn: Spawner) -> None:
        """A file with several problems in several tables: one line for each, in the file's order, code 2."""
        config = write(
            spawn,
            "svc.toml",
            "[service]\nlog_level = 'loud'\n[programs.web]\ncommand = 'x'\n"
            "stop_signal = 'XYZZY'\nkill_after = -1\n[groups.g]\nchildren = ['api']\n",
        )
        child = aiobus(spawn, "check", "--config", config)
        assert child.wait(WAIT) == 2, child.output
        assert [
            "aiobus: error: svc.toml: [service] log_level: expected one of 'debug', 'info', 'warning', 'error', "
            "got 'loud'",
            "aiobus: error: svc.toml: [programs.web] stop_signal: unknown signal 'XYZZY'",
            "aiobus: error: svc.toml: [programs.web] kill_after: expected a finite number of seconds >= 0, got -1",
            "aiobus: error: svc.toml: [groups.g] children: no program or broker named 'api'",
        ] == child.lines

    def test_a_bad_procfile_line_names_the_file_and_line(self, spawn: Spawner) -> None:
        """A Procfile line that is not NAME: COMMAND: one line naming the file and the line, code 2."""
        procfile = write(spawn, "Procfile", "web: sleep 600\nnot a program line\n")
        for command in ("check", "run"):
            child = aiobus(spawn, command, "--procfile", procfile)
            assert child.wait(WAIT) == 2, child.output
            assert [
                "aiobus: error: Procfile:2: expected NAME: COMMAND, where NAME is letters, digits, '_' and '-'"
            ] == child.lines

    def test_run_without_a_target_or_a_file_is_one_line(self, spawn: Spawner) -> None:
        """``aiobus run`` alone: one line saying what it needs, code 2."""
        child = aiobus(spawn, "run")
        assert child.wait(WAIT) == 2, child.output
        assert ["aiobus: error: run needs TARGET, --config FILE or --procfile FILE (see --help)"] == child.lines

    def test_help_names_the_file_options_and_check(self, spawn: Spawner) -> None:
        """``run --help`` names --config and --procfile; ``check --help`` exits 0."""
        child = aiobus(spawn, "run", "--help")
        assert child.wait(WAIT) == 0, child.output
        assert "--config" in child.output and "--procfile" in child.output
        assert aiobus(spawn, "check", "--help").wait(WAIT) == 0
