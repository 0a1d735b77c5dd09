"""Service files checked: the spec a valid file gives, the problems of a bad one, the README's table of keys."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from aiobus import Bus, ChildBroker, Supervisor
from aiobus._config import ConfigError, ServiceSpec, build, load_service
from aiobus._config.build import Service
from aiobus._config.procfile import load_procfile
from aiobus._config.schema import keys_table
from aiobus.plugins import LineReady, PortReady, Subprocess

ROOT = Path(__file__).resolve().parent.parent.parent


def problems(tmp_path: Path, text: str, env: str = "") -> list[str]:
    """The problems of a file ``svc.toml`` holding ``text`` (with ``app.env`` holding ``env``)."""
    (tmp_path / "svc.toml").write_text(text)
    (tmp_path / "app.env").write_text(env)
    with pytest.raises(ConfigError) as caught:
        load_service(str(tmp_path / "svc.toml"), {})
    prefix = f"{tmp_path}/"
    return [problem.removeprefix(prefix) for problem in caught.value.problems]


def spec_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ServiceSpec:
    (tmp_path / "svc.toml").write_text(text)
    return load_service(str(tmp_path / "svc.toml"), environ or {})


class TestValidFiles:
    def test_service_keys_become_the_command_settings(self, tmp_path: Path) -> None:
        """[service] keys map to the command's settings; a relative pid_file is in the file's folder."""
        spec = spec_of(
            tmp_path,
            '[service]\nmain_interval = 1\nstop_timeout = 0\npid_file = "run/svc.pid"\nuser = 65534\n'
            'umask = "027"\nlog_level = "debug"\n',
        )
        assert {
            "main_interval": 1.0,
            "stop_timeout": 0.0,
            "pidfile": str(tmp_path / "run" / "svc.pid"),
            "user": 65534,
            "umask": 0o027,
            "log_level": "debug",
        } == spec.settings

    def test_a_toml_octal_umask_is_accepted(self, tmp_path: Path) -> None:
        """``umask = 0o027`` is the same as ``"027"``."""
        assert 0o027 == spec_of(tmp_path, "[service]\numask = 0o027\n").settings["umask"]

    def test_a_command_is_split_like_a_shell_would_and_argv_is_taken_as_is(self, tmp_path: Path) -> None:
        """``command`` is split with shlex (quotes kept together), ``argv`` is used as it is."""
        spec = spec_of(tmp_path, "[programs.a]\ncommand = \"echo 'a b' c\"\n[programs.b]\nargv = ['x y']\n")
        assert [["echo", "a b", "c"], ["x y"]] == [child.argv for child in spec.children]

    def test_env_wins_over_env_files_in_order_over_the_inherited_environment(self, tmp_path: Path) -> None:
        """The environment of a program: inherited, then each env file (the later wins), then env."""
        (tmp_path / "one.env").write_text("A=one\nB=one\nC=one\n")
        (tmp_path / "two.env").write_text("B=two\nC=two\n")
        spec = spec_of(
            tmp_path,
            "[programs.a]\ncommand = 'x'\nenv_file = ['one.env', 'two.env']\nenv = { C = 'env' }\n",
            {"A": "inherited", "D": "inherited"},
        )
        assert {"A": "one", "B": "two", "C": "env", "D": "inherited"} == spec.children[0].kwargs["env"]

    def test_a_program_without_env_inherits_the_environment_as_it_is(self, tmp_path: Path) -> None:
        """No env nor env_file: no env argument at all (the program inherits at its start)."""
        assert "env" not in spec_of(tmp_path, "[programs.a]\ncommand = 'x'\n").children[0].kwargs

    def test_the_objects_are_made_as_declared(self, tmp_path: Path) -> None:
        """Programs, brokers and groups become Subprocess, ChildBroker and Supervisor with the file's values."""
        spec = spec_of(
            tmp_path,
            "[programs.web]\ncommand = 'web --port 8000'\nstop_signal = 'INT'\nkill_after = 3\n"
            "ready = { port = 8000, host = 'localhost' }\n[programs.log]\nargv = ['tail']\n"
            "ready = { line = '^up', stream = 'stderr' }\nrestart = 'transient'\n"
            "[brokers.jobs]\ntarget = 'x:y'\ngrace = 1.5\nsend_timeout = 2\n"
            "[groups.site]\nchildren = ['jobs', 'web']\nstrategy = 'rest_for_one'\nmax_restarts = 7\n",
        )
        children = build(Bus(), Service(spec, functions={"jobs": worker}), subscribe=False)
        assert ["log", "jobs", "web"] == list(children)  # the default group first, then the group's order
        web, log, jobs = children["web"], children["log"], children["jobs"]
        assert isinstance(web, Subprocess) and isinstance(log, Subprocess) and isinstance(jobs, ChildBroker)
        assert (["web", "--port", "8000"], signal.SIGINT, 3.0) == (web.argv, web.stop_signal, web.kill_after)
        assert PortReady(8000, host="localhost") == web.ready
        assert isinstance(log.ready, LineReady) and ("^up", "stderr") == (log.ready.pattern, log.ready.stream)
        assert "transient" == log.restart
        assert (1.5, 2.0) == (jobs.grace, jobs.send_timeout)
        assert isinstance(web.supervisor, Supervisor) and web.supervisor is jobs.supervisor
        assert ("rest_for_one", 7) == (web.supervisor.strategy, web.supervisor.max_restarts)
        assert log.supervisor is None  # it joins the bus's default group when subscribed

    def test_instances_and_pools_are_made_as_declared(self, tmp_path: Path) -> None:
        """instances with base_port fill {port}, {index} and the ready port; workers make a pool."""
        spec = spec_of(
            tmp_path,
            "[programs.web]\ncommand = 'web --port {port} --id {index}'\ninstances = 2\nbase_port = 9000\n"
            "ready = { port = '{port}' }\n[brokers.jobs]\ntarget = 'x:y'\nworkers = 3\n",
        )
        children = build(Bus(), Service(spec, functions={"jobs": worker}), subscribe=False)
        web, jobs = children["web"], children["jobs"]
        assert isinstance(web, Subprocess) and isinstance(jobs, ChildBroker)
        assert [["web", "--port", "9000", "--id", "0"], ["web", "--port", "9001", "--id", "1"]] == [
            member.argv for member in web.members
        ]
        assert [PortReady(9000), PortReady(9001)] == [member.ready for member in web.members]
        assert ["jobs[0]", "jobs[1]", "jobs[2]"] == [member.name for member in jobs.members]

    def test_base_port_without_instances_is_a_problem(self, tmp_path: Path) -> None:
        """base_port alone names what it goes with."""
        assert ["svc.toml: [programs.web] base_port: goes with instances"] == problems(
            tmp_path, "[programs.web]\ncommand = 'x'\nbase_port = 9000\n"
        )


async def worker(bus: Bus, link: Any) -> None:
    """A broker's function for the tests."""


class TestProblems:
    def test_every_problem_is_collected_in_the_files_order(self, tmp_path: Path) -> None:
        """The README's sample output, from the file it describes."""
        (tmp_path / "web.env").write_text("A=1\nB=2\nnot a line\n")
        found = problems(
            tmp_path,
            "[service]\nstop_timout = 3\n[programs.web]\ncommand = 'x'\nstop_signal = 'SIGTREM'\n"
            "ready = { port = '80x' }\nenv_file = 'web.env'\n[groups.site]\nchildren = ['wbe']\n",
        )
        readme = (ROOT / "README.md").read_text().split("$ aiobus check --config aiobus.toml\n", 1)[1]
        shown = readme.split("```", 1)[0].replace("aiobus: error: ", "").replace("aiobus.toml", "svc.toml")
        assert shown.splitlines() == found

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            (
                "[service]\nmain_interval = 0\n",
                "[service] main_interval: expected a positive finite number of seconds, got 0",
            ),
            (
                "[service]\nlog_format = 'xml'\n",
                "[service] log_format: expected one of 'auto', 'console', 'json', got 'xml'",
            ),
            (
                "[service]\numask = '0999'\n",
                "[service] umask: expected an octal umask within 000..777, such as \"027\", got '0999'",
            ),
            ("[service]\nreload = 'yes'\n", "[service] reload: expected a boolean, got a string, 'yes'"),
            ("service = 3\n", "service: expected a table, got an integer, 3"),
            ("[programs]\nweb = 3\n", "[programs] web: expected a table, got an integer, 3"),
            ("[programs.'a b']\ncommand = 'x'\n", "[programs.a b]: a name is letters, digits, '_', '.' and '-'"),
            ("[programs.a]\ncommand = 'x'\nargv = ['x']\n", "[programs.a]: give command or argv, not both"),
            ("[programs.a]\ncommand = 'x \"y'\n", "[programs.a] command: no closing quotation"),
            ("[programs.a]\ncommand = '  '\n", "[programs.a] command: expected a command line, got an empty one"),
            (
                "[programs.a]\ncommand = 'x'\nenv = { TOKEN = 42 }\n",
                "[programs.a] env.TOKEN: expected a string, got an integer",
            ),
            ("[programs.a]\ncommand = 'x'\nready = {}\n", "[programs.a.ready]: give port or line (one of them)"),
            (
                "[programs.a]\ncommand = 'x'\nready = { port = 70000 }\n",
                "[programs.a.ready] port: expected a TCP port from 1 to 65535, got 70000",
            ),
            (
                "[programs.a]\ncommand = 'x'\nready = { line = '(' }\n",
                "[programs.a.ready] line: not a regular expression: missing ), unterminated subpattern at position 0",
            ),
            (
                "[programs.a]\ncommand = 'x'\nrestart = 'always'\n",
                "[programs.a] restart: expected one of 'permanent', 'transient', 'temporary', got 'always'",
            ),
            ("[brokers.b]\ntarget = 'module'\n", "[brokers.b] target: expected package.module:function, got 'module'"),
            (
                "[programs.a]\ncommand = 'x'\n[brokers.a]\ntarget = 'm:f'\n",
                "[brokers.a]: a program has this name too: names must differ",
            ),
            (
                "[programs.a]\ncommand = 'x'\n[groups.g]\nchildren = ['a']\n[groups.h]\nchildren = ['a']\n",
                "[groups.h] children: 'a' is in group 'g' already",
            ),
            ("[groups.g]\nstrategy = 'one_for_one'\n", "[groups.g]: missing required key 'children'"),
        ],
    )
    def test_a_bad_value_is_one_problem_naming_table_and_key(self, tmp_path: Path, text: str, problem: str) -> None:
        """Each bad value: one problem naming the file, the table and the key."""
        assert [f"svc.toml: {problem}"] == problems(tmp_path, text)

    def test_an_env_value_is_never_shown(self, tmp_path: Path) -> None:
        """A wrong type in env names the key and the type, not the value."""
        [problem] = problems(tmp_path, "[programs.a]\ncommand = 'x'\nenv = { TOKEN = 123456789 }\n")
        assert "123456789" not in problem

    def test_a_liveness_check_is_made_as_declared(self, tmp_path: Path) -> None:
        """liveness takes the keys of ready; live_interval and live_failures go with it."""
        spec = spec_of(
            tmp_path,
            "[programs.web]\ncommand = 'web'\nliveness = { port = 8000 }\nlive_interval = 2\nlive_failures = 5\n",
        )
        web = build(Bus(), Service(spec, functions={}), subscribe=False)["web"]
        assert isinstance(web, Subprocess)
        assert (PortReady(8000), 2.0, 5) == (web.live, web.live_interval, web.live_failures)


class TestProcfiles:
    def test_each_line_is_a_program_run_by_the_shell(self, tmp_path: Path) -> None:
        """NAME: COMMAND lines, comments and blank lines skipped: programs through /bin/sh -c, in order."""
        (tmp_path / "Procfile").write_text("# comment\nweb: serve --port $PORT\n\nworker-2 :  work && rest\n")
        spec = load_procfile(str(tmp_path / "Procfile"))
        assert [("web", ["/bin/sh", "-c", "serve --port $PORT"]), ("worker-2", ["/bin/sh", "-c", "work && rest"])] == [
            (child.name, child.argv) for child in spec.children
        ]

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            ("web: x\nweb: y\n", "Procfile:2: web: a program of that name is above already"),
            ("web:\n", "Procfile:1: web: the command is empty"),
            ("# nothing\n", "Procfile: no program in the file (expected NAME: COMMAND lines)"),
        ],
    )
    def test_a_bad_procfile_is_a_problem_naming_the_line(self, tmp_path: Path, text: str, problem: str) -> None:
        """Duplicates, empty commands and empty files are refused, naming the line."""
        (tmp_path / "Procfile").write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_procfile(str(tmp_path / "Procfile"))
        assert [f"{tmp_path}/{problem}"] == caught.value.problems


def test_the_readme_table_of_keys_is_the_schema() -> None:
    """The README's table of keys is the one the schema gives: they cannot drift apart."""
    assert keys_table() in (ROOT / "README.md").read_text()
