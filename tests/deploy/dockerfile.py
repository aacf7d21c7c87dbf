"""The Dockerfile, read and partly replayed without a Docker engine.

:func:`parse` reads the instructions the way the builder does (continuation lines, comments, stages, exec form);
:func:`replay_build` runs one stage's ARG, ENV, WORKDIR, COPY and RUN steps on this machine, with the stage's paths
redirected through its ARGs (the Dockerfile writes ``${VENV}``, never ``/opt/alex``), so that the install steps the
image runs are the ones the tests run. :func:`image_config` is what the final stage hands to the container: its
environment, user, port, health check, entry point and command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    """Upper case: ``RUN``, ``COPY``…"""
    value: str
    """The rest, continuation lines joined."""
    line: int


@dataclass(slots=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Dockerfile:
    global_args: dict[str, str]
    """ARGs before the first FROM, with their defaults."""
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}")


@dataclass(frozen=True, slots=True)
class ImageConfig:
    env: dict[str, str]
    user: str | None
    workdir: str | None
    exposed: list[int]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str] | None
    """The health check's command (exec form)."""


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments end nothing, even inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        lines.append((start, " ".join(part for part in pending if part)))
        pending = []
    if pending:
        raise ValueError(f"line {start}: the last instruction ends with a continuation")
    return lines


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in _logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"line {number}: only ARG may come before the first FROM")
            name, _, default = value.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, value, number))
    return Dockerfile(global_args, stages)


def expand(text: str, variables: Mapping[str, str]) -> str:
    """``$NAME``, ``${NAME}`` and ``${NAME:-default}``, as the builder expands them in ENV, WORKDIR and COPY."""

    def value(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        found = variables.get(name, "")
        if not found and match.group("default") is not None:
            return match.group("default")
        return found

    return _VARIABLE.sub(value, text)


def _pairs(value: str, variables: Mapping[str, str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for word in shlex.split(value):
        name, equals, assigned = word.partition("=")
        if not equals:
            raise ValueError(f"expected NAME=value, got {word!r}")
        pairs[name] = expand(assigned, {**variables, **pairs})
    return pairs


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    if not isinstance(parsed, list) or not all(isinstance(part, str) for part in parsed):
        raise ValueError(f"expected the exec form (a JSON list of strings), got {value!r}")
    return parsed


def _copy_into(source: Path, destination: Path, *, into_folder: bool) -> None:
    if source.is_dir():
        # COPY of a folder copies what it holds, not the folder itself.
        shutil.copytree(source, destination, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return
    target = destination / source.name if into_folder else destination
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def replay_build(dockerfile: Dockerfile, stage_name: str, *, context: Path, args: Mapping[str, str],
                 env: Mapping[str, str]) -> None:
    """Run the stage's steps here: ARG (``args`` win over the defaults), ENV, WORKDIR, COPY from ``context``, RUN
    with ``/bin/sh -c`` in ``env`` plus the stage's variables. Anything else in a build stage is refused, so that
    a step this replay does not know cannot be skipped unnoticed."""
    variables: dict[str, str] = {}
    workdir = Path("/")
    for step in dockerfile.stage(stage_name).instructions:
        if step.keyword == "ARG":
            name, _, default = step.value.partition("=")
            variables[name] = args.get(name, expand(default, variables))
        elif step.keyword == "ENV":
            variables.update(_pairs(step.value, variables))
        elif step.keyword == "WORKDIR":
            workdir = workdir / expand(step.value, variables)
            workdir.mkdir(parents=True, exist_ok=True)
        elif step.keyword == "COPY":
            words = [expand(word, variables) for word in shlex.split(step.value)]
            if any(word.startswith("--") for word in words):
                raise ValueError(f"line {step.line}: COPY flags are not replayed: {step.value}")
            *sources, target = words
            destination = workdir / target
            into_folder = target.endswith("/") or len(sources) > 1
            for source in sources:
                _copy_into(context / source, destination, into_folder=into_folder)
        elif step.keyword == "RUN":
            if step.value.startswith("["):
                raise ValueError(f"line {step.line}: RUN in exec form is not replayed")
            result = subprocess.run(["/bin/sh", "-c", step.value], cwd=workdir, env={**env, **variables},
                                    capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise AssertionError(f"Dockerfile line {step.line} failed ({result.returncode}): {step.value}\n"
                                     f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        else:
            raise ValueError(f"line {step.line}: {step.keyword} is not replayed in a build stage")


def image_config(dockerfile: Dockerfile, *, args: Mapping[str, str], base_env: Mapping[str, str]) -> ImageConfig:
    """What the last stage gives its container; ``base_env`` stands for the base image's own environment."""
    variables: dict[str, str] = dict(base_env)
    env: dict[str, str] = {}
    user: str | None = None
    workdir: str | None = None
    exposed: list[int] = []
    entrypoint: list[str] = []
    cmd: list[str] = []
    healthcheck: list[str] | None = None
    for step in dockerfile.stages[-1].instructions:
        if step.keyword == "ARG":
            name, _, default = step.value.partition("=")
            variables[name] = args.get(name, expand(default, variables))
        elif step.keyword == "ENV":
            pairs = _pairs(step.value, variables)
            variables.update(pairs)
            env.update(pairs)
        elif step.keyword == "USER":
            user = step.value
        elif step.keyword == "WORKDIR":
            workdir = expand(step.value, variables)
        elif step.keyword == "EXPOSE":
            exposed += [int(port.split("/")[0]) for port in step.value.split()]
        elif step.keyword == "ENTRYPOINT":
            entrypoint = _exec_form(step.value)
        elif step.keyword == "CMD":
            cmd = _exec_form(step.value)
        elif step.keyword == "HEALTHCHECK":
            _, found, command = step.value.partition(" CMD ")
            healthcheck = _exec_form(command.strip()) if found else None
    return ImageConfig(env=env, user=user, workdir=workdir, exposed=exposed, entrypoint=entrypoint, cmd=cmd,
                       healthcheck=healthcheck)


def interpreter_path() -> str:
    """A PATH whose ``python`` is the interpreter the tests run on (not a virtual environment's): the base image's
    ``python`` stands for it."""
    return os.pathsep.join([str(Path(sys.base_prefix) / "bin"), os.environ.get("PATH", "")])
