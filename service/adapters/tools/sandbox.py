"""How the bash tool's commands are confined: an unprivileged user, resource limits, and bubblewrap when present.

The layers, outermost first:

- **user**: when the server runs as root, bash runs as ``nobody`` (``ALEX_SANDBOX_USER``), because the kernel
  enforces no process-count limit on root and root reads every file. The workspace is given to that user.
- **bubblewrap** (``bwrap``, ``ALEX_SANDBOX_BWRAP``): a read-only view of the root filesystem, no network, its own
  process, IPC and host-name namespaces, a private ``/proc`` and ``/tmp``, and the data folder hidden but for the
  session's own workspace (so neither the database, the secret nor another session's files can be read).
- **resource limits** (``prlimit``): CPU seconds, address space, file size, processes and open files.

docs/security.md states what this does and does not protect against.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from service.config import Settings

log = structlog.get_logger("service.sandbox")

NOBODY = (65534, 65534)
_MB = 1024 * 1024


class SandboxUnavailable(Exception):
    """The configured sandbox cannot be had on this machine (``ALEX_SANDBOX_BWRAP=on`` without ``bwrap``)."""


@dataclass(frozen=True, slots=True)
class Sandbox:
    cpu_seconds: int
    memory_bytes: int
    file_size_bytes: int
    max_processes: int
    max_open_files: int
    user: tuple[int, int] | None = None
    """``(uid, gid)`` to run as; None: the server's own."""
    bwrap: str | None = None
    """The ``bwrap`` executable; None: no namespaces."""
    hidden: tuple[Path, ...] = ()
    """Folders bubblewrap covers with an empty tmpfs (the data folder); the workspace is bound back inside."""
    prlimit: str | None = "prlimit"
    setpriv: str = "setpriv"

    def command(self, argv: Sequence[str], workspace: Path) -> list[str]:
        """``argv`` wrapped: setpriv (to the sandbox user), bubblewrap (when set), prlimit.

        The user is changed by a command rather than by ``Popen(user=…)``, which uvloop's subprocesses lack.
        """
        inner = list(argv)
        if self.prlimit is not None:
            inner = [
                self.prlimit,
                f"--cpu={self.cpu_seconds}",
                f"--as={self.memory_bytes}",
                f"--fsize={self.file_size_bytes}",
                f"--nproc={self.max_processes}",
                f"--nofile={self.max_open_files}",
                "--",
                *inner,
            ]
        if self.bwrap is not None:
            inner = self._bubblewrap(workspace) + inner
        if self.user is not None:
            uid, gid = self.user
            inner = [self.setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *inner]
        return inner

    def _bubblewrap(self, workspace: Path) -> list[str]:
        assert self.bwrap is not None
        outer = [self.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]  # noqa: S108 -- a fresh tmpfs
        for folder in self.hidden:
            outer += ["--tmpfs", str(folder)]
        outer += [
            "--bind", str(workspace), str(workspace),
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent",
            "--chdir", str(workspace),
            "--",
        ]
        return outer

    def give(self, path: Path) -> None:
        """Hand a path the server made (a workspace, a file a tool wrote) to the sandbox user."""
        if self.user is not None:
            os.chown(path, *self.user, follow_symlinks=False)


BWRAP_PROBE_SECONDS = 5.0


def bwrap_failure(bwrap: str) -> str | None:
    """Why ``bwrap`` cannot build the sandbox's namespaces on this machine (its first error line), or None."""
    probe = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",  # noqa: S108
             "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--", "true"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=BWRAP_PROBE_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[0] if lines else f"exit status {done.returncode}"


def _user(setting: str) -> tuple[int, int] | None:
    if setting == "none":
        return None
    if setting == "auto":
        return NOBODY if os.geteuid() == 0 else None
    uid, gid = setting.split(":")
    return int(uid), int(gid)


def blocking_folder(path: Path, uid: int, gid: int) -> Path | None:
    """The first folder on the way to ``path`` that ``uid``/``gid`` may not pass through, or None."""
    for folder in [*reversed(path.parents), path]:
        try:
            info = folder.stat()
        except FileNotFoundError:
            return None  # made later, by the server, with the right modes
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return folder
    return None


def sandbox_from_settings(settings: Settings) -> Sandbox:
    """The sandbox the settings describe; :class:`SandboxUnavailable` (one line, for the operator) when it can't
    work here."""
    bwrap = shutil.which("bwrap") if settings.sandbox_bwrap != "off" else None
    if settings.sandbox_bwrap == "on" and bwrap is None:
        raise SandboxUnavailable("ALEX_SANDBOX_BWRAP=on but bwrap (bubblewrap) is not installed")
    if bwrap is not None:
        failure = bwrap_failure(bwrap)
        if failure is not None and settings.sandbox_bwrap == "on":
            raise SandboxUnavailable(f"ALEX_SANDBOX_BWRAP=on but bwrap cannot make its namespaces here: {failure}")
        if failure is not None:
            # A restricted pod (no user namespaces, no /proc mount): every command would fail inside bwrap.
            log.warning("bash_sandbox_weak", reason=failure, bwrap="unusable: commands run without namespaces")
            bwrap = None
    user = _user(settings.sandbox_user)
    setpriv = shutil.which("setpriv")
    if user is not None and setpriv is None:
        raise SandboxUnavailable("ALEX_SANDBOX_USER: changing user needs setpriv (util-linux), which is missing")
    if user is not None:
        blocked = blocking_folder(settings.workspaces_dir.resolve(), *user)
        if blocked is not None:
            raise SandboxUnavailable(
                f"ALEX_DATA_DIR: bash runs as {user[0]}:{user[1]}, which cannot pass through {blocked} "
                "(make it traversable: chmod o+x; or set ALEX_SANDBOX_USER)"
            )
    return Sandbox(
        cpu_seconds=settings.sandbox_cpu_seconds,
        memory_bytes=settings.sandbox_memory_mb * _MB,
        file_size_bytes=settings.sandbox_file_size_mb * _MB,
        max_processes=settings.sandbox_max_processes,
        max_open_files=settings.sandbox_max_open_files,
        user=user,
        bwrap=bwrap,
        hidden=(settings.data_dir.resolve(),),
        prlimit=shutil.which("prlimit"),
        setpriv=setpriv or "setpriv",
    )
