"""Environment files: KEY=VALUE lines, comments, quotes, ``export``, ``${NAME}``; values never in a message."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiobus._config.envfile import EnvProblem, parse_env, read_env_file

ENVIRON = {"HOME": "/home/ada", "SECRET": "s3cr3t"}


def parse(text: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of ``text``, which must have no problem."""
    values, problems = parse_env(text, "app.env", ENVIRON if environ is None else environ)
    assert [] == problems
    return values


def problems_of(text: str) -> list[str]:
    return [str(problem) for problem in parse_env(text, "app.env", ENVIRON)[1]]


class TestSyntax:
    def test_key_value_lines_give_variables_in_order(self) -> None:
        """Plain KEY=VALUE lines give their variables, in the file's order."""
        assert [("A", "1"), ("B", "two")] == list(parse("A=1\nB=two\n").items())

    def test_blank_lines_and_comments_are_skipped(self) -> None:
        """Blank lines and lines starting with '#' (after blanks) give nothing."""
        assert {"A": "1"} == parse("\n# a comment\n   # indented comment\n\nA=1\n   \n")

    def test_export_prefix_is_allowed(self) -> None:
        """``export KEY=VALUE`` is KEY=VALUE, so that a shell can source the file."""
        assert {"A": "1", "exported": "x"} == parse("export A=1\nexported=x\n")

    def test_unquoted_values_are_stripped_and_end_at_a_comment_after_a_blank(self) -> None:
        """Blanks around an unquoted value go, `` #`` starts a comment, a '#' inside a word stays."""
        assert {"A": "x y", "B": "a#b", "C": ""} == parse("A =  x y   # the x\nB=a#b\nC=\n")

    def test_single_quotes_keep_everything_as_it_is(self) -> None:
        """Single quotes keep blanks, '#', backslashes and ``${...}`` literally."""
        assert {"A": r" a # \n ${HOME} "} == parse(r"A=' a # \n ${HOME} '")

    def test_double_quotes_understand_escapes(self) -> None:
        """Double quotes: \\", \\\\, \\$, \\n and \\t; other backslashes stay."""
        assert {"A": 'say "hi"\n\t\\ $ \\d'} == parse(r'A="say \"hi\"\n\t\\ \$ \d"')

    def test_a_comment_may_follow_a_closing_quote(self) -> None:
        """Blanks and a comment after the closing quote are allowed."""
        assert {"A": "x", "B": "y"} == parse("A='x'  # note\nB=\"y\"\n")

    def test_a_key_given_twice_keeps_its_last_value(self) -> None:
        """The last line for a key wins."""
        assert {"A": "2"} == parse("A=1\nA=2\n")

    def test_equals_signs_in_a_value_are_kept(self) -> None:
        """Only the first '=' separates the key from the value."""
        assert {"URL": "postgres://u:p@h/db?a=b"} == parse("URL=postgres://u:p@h/db?a=b\n")


class TestExpansion:
    def test_a_reference_reads_the_service_environment(self) -> None:
        """``${NAME}`` in an unquoted or double-quoted value comes from the service's environment."""
        assert {"A": "/home/ada/data", "B": "at /home/ada"} == parse('A=${HOME}/data\nB="at ${HOME}"\n')

    def test_a_key_above_in_the_file_wins_over_the_environment(self) -> None:
        """A key defined earlier in the file is what ``${NAME}`` gives, before the environment."""
        assert "/srv/x" == parse("HOME=/srv\nA=${HOME}/x\n")["A"]

    def test_a_default_applies_when_the_name_is_set_nowhere(self) -> None:
        """``${NAME:-default}`` gives the default only when NAME is set nowhere."""
        assert {"A": "8000", "B": "/home/ada"} == parse("A=${PORT:-8000}\nB=${HOME:-/}\n")

    def test_an_escaped_dollar_is_not_a_reference(self) -> None:
        """``\\${HOME}`` in double quotes stays as written."""
        assert {"A": "${HOME}"} == parse(r'A="\${HOME}"')

    def test_an_unset_name_without_a_default_is_a_problem(self) -> None:
        """A reference to a name set nowhere is a problem naming the file, the line and the name."""
        assert ["app.env:2: TOKEN: ${API_TOKEN} is not set (neither above in the file nor in the environment)"] == (
            problems_of("A=1\nTOKEN=${API_TOKEN}\n")
        )


class TestProblems:
    @pytest.mark.parametrize(
        ("line", "problem"),
        [
            ("just words", "expected KEY=VALUE (no '=' on the line)"),
            ("1KEY=x", "expected KEY=VALUE, where KEY is letters, digits and '_', not starting with a digit"),
            ("MY-KEY=x", "expected KEY=VALUE, where KEY is letters, digits and '_', not starting with a digit"),
            ("=x", "expected KEY=VALUE, where KEY is letters, digits and '_', not starting with a digit"),
            ("A='open", "A: the single quote is not closed on this line"),
            ('A="open', "A: the double quote is not closed on this line"),
            ("A='x' y", "A: unexpected text after the closing quote"),
            ("A=${HOME", "A: '${' without a closing '}'"),
            ("A=${not a name}", "A: ${not a name} is not a variable name"),
        ],
    )
    def test_a_line_that_does_not_parse_is_one_problem_naming_file_and_line(self, line: str, problem: str) -> None:
        """Each bad line is a problem ``file:line: what``; the lines around it still parse."""
        values, problems = parse_env(f"A0=ok\n{line}\nZ=ok\n", "app.env", ENVIRON)
        assert [EnvProblem("app.env", 2, problem)] == problems
        assert {"A0": "ok", "Z": "ok"} == values

    def test_every_bad_line_is_reported(self) -> None:
        """Problems are collected, not stopped at the first."""
        assert ["app.env:1", "app.env:3"] == [p.split(": ")[0] for p in problems_of("x\nA=1\ny\n")]

    def test_values_never_appear_in_a_problem(self) -> None:
        """A problem on a line holding a secret does not quote the secret, nor one it expands."""
        problems = problems_of("PASSWORD='hunter2 and more\nTOKEN=\"${SECRET} and more\n")
        assert len(problems) == 2
        assert not any("hunter2" in problem or "s3cr3t" in problem for problem in problems)

    def test_a_missing_file_is_a_problem_at_line_0(self, tmp_path: Path) -> None:
        """A file that cannot be read is one problem naming it."""
        missing = str(tmp_path / "none.env")
        assert ({}, [EnvProblem(missing, 0, "cannot read the environment file: No such file or directory")]) == (
            read_env_file(missing, ENVIRON)
        )

    def test_a_file_is_read_as_utf8(self, tmp_path: Path) -> None:
        """read_env_file parses a file's UTF-8 text."""
        path = tmp_path / "app.env"
        path.write_text("GREETING=héllo\n", encoding="utf-8")
        assert ({"GREETING": "héllo"}, []) == read_env_file(str(path), ENVIRON)
