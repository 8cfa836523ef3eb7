"""Where a measurement comes from: the command, the commit, the version, the machine and the date.

Every JSON a report or a benchmark writes carries ``provenance()`` under ``"provenance"``, and the generated
documentation pages print it above each table, so a figure always names what produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training import __version__
from training.config import REPO_ROOT


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def commit() -> str:
    """The checkout's commit (short hash), with ``-dirty`` when tracked files differ from it; '' outside git."""
    head = _git("rev-parse", "--short=7", "HEAD")
    if head and _git("status", "--porcelain", "--untracked-files=no"):
        head += "-dirty"
    return head


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """The machine a figure was measured on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": _cpu_model(), "cores": cores, "memory_gib": _memory_gib(), "arch": platform.machine(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def describe_machine(m: dict[str, Any]) -> str:
    """One line: '2 cores (AMD EPYC 7B13), 23.4 GiB, x86_64, Linux 6.1'."""
    mem = f", {m['memory_gib']} GiB" if m.get("memory_gib") else ""
    return f"{m.get('cores')} cores ({m.get('cpu')}){mem}, {m.get('arch')}, {m.get('os')}"


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it from the repository root: the interpreter or console script of this
    checkout's venv shown relative to it (``.venv/bin/retrieval report ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py") and not Path(argv[0]).name.startswith("__"):
        argv = [sys.executable, *argv]
    elif argv and argv[0] == "-c":
        argv = [sys.executable, *argv]
    out = []
    for i, arg in enumerate(argv):
        p = Path(arg)
        if p.is_absolute() and (i < 2 or p.exists()):
            try:
                arg = str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else arg
            except ValueError:
                pass
        out.append(arg)
    return shlex.join(out)


def provenance(argv: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """{command, commit, version, machine, date (UTC), load average} of the running process, plus ``extra``."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"command": command_line(argv), "commit": commit(), "version": __version__, "machine": machine(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average": [round(x, 2) for x in load] if load else None, **extra}
