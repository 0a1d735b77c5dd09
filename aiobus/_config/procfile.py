"""Procfiles: ``name: command`` lines, one program each, as honcho and foreman read them.

Each command runs through ``/bin/sh -c`` (so ``$VAR``, pipes and ``&&`` work as in honcho),
in its own process group, restarted if it ends (``permanent``), in the bus's default group,
in the order of the file. Blank lines and ``#`` comments are skipped.
"""

from __future__ import annotations

import os
import re

from .validate import ChildSpec, ConfigError, ServiceSpec

_LINE = re.compile(r"([A-Za-z0-9_-]+)\s*:\s*(.*)")


def load_procfile(path: str) -> ServiceSpec:
    """Read a Procfile.

    Raises:
        ConfigError: with every problem (a missing file, or each line that does not parse).
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError([f"{path}: cannot read the file: {reason}"]) from None
    spec = ServiceSpec(path, files=[os.path.abspath(path)])
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        found = _LINE.fullmatch(stripped)
        if found is None:
            problems.append(f"{path}:{number}: expected NAME: COMMAND, where NAME is letters, digits, '_' and '-'")
        elif not found[2].strip():
            problems.append(f"{path}:{number}: {found[1]}: the command is empty")
        elif any(child.name == found[1] for child in spec.children):
            problems.append(f"{path}:{number}: {found[1]}: a program of that name is above already")
        else:
            spec.children.append(ChildSpec("program", found[1], argv=["/bin/sh", "-c", found[2].strip()]))
    if problems:
        raise ConfigError(problems)
    if not spec.children:
        raise ConfigError([f"{path}: no program in the file (expected NAME: COMMAND lines)"])
    return spec
