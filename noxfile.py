"""Sessions: tests (with coverage), lint, typecheck. Each uses the running interpreter."""

import os
import tempfile

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.error_on_external_run = True
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against the installed package, with coverage (fail under 89%: about 90.5%
    is measured, and some branches depend on timing)."""
    session.install(".[reload,redis,test]")  # the test extra (pyproject.toml) lists the test dependencies
    # Child processes write their coverage data too: some run as another user (after
    # DropPrivileges) or elsewhere (a daemon's chdir("/")), so the data goes to an
    # absolute path in a folder anyone may write to, sticky like /tmp.
    with tempfile.TemporaryDirectory(prefix="aiobus-coverage-") as data:
        os.chmod(data, 0o1777)
        session.run(
            "pytest",
            "--cov",
            "--cov-report=term-missing",
            "--cov-fail-under=89",
            *session.posargs,
            env={"COVERAGE_FILE": os.path.join(data, ".coverage")},
        )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and its tests."""
    session.install(".[reload,redis,test]", "mypy")
    session.run("mypy", "--strict", "aiobus", "tests")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (bench/): figures and ratios against baselines measured in the same run."""
    # rich too: a child's memory is measured as a user with rich installed would see it
    session.install(".[redis]", "trio>=0.25", "cherrypy", "rich")
    for script in sorted(os.listdir("bench")):
        if script.startswith("bench_") and script.endswith(".py"):
            session.run("python", os.path.join("bench", script), *session.posargs)
