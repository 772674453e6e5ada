"""What a result was produced with: package versions and commit, CPU/GPU, threads, device, exact command.

Seconds depend on all of these (and on other load on the machine), and a result is only reproducible with
the same code: every results folder appends one record per command that worked on it (a study resumed
three times has three), and every run's ``summary.json`` carries the record of the process that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import __version__

__all__ = ["ENVIRONMENT", "describe_environment", "append_environment", "git_state", "first_record",
           "code_differences", "ARITHMETIC_LIBRARIES"]

#: The libraries of ``versions`` whose version changes a run's arithmetic: compared on resume.
ARITHMETIC_LIBRARIES = ("torch", "asdl", "numpy", "pytorch_optimizer", "schedulefree")

ENVIRONMENT = "environment.jsonl"
PACKAGE = Path(__file__).resolve().parents[1]  # fop_asdl/
PACKAGE_ROOT = PACKAGE.parent  # the checkout holding fop_asdl/, when run from one


def describe_environment(argv: Sequence[str], device: torch.device, world_size: int) -> Dict[str, Any]:
    """The record of this process; ``argv`` are the arguments after the program name."""
    return {
        "command": shlex.join(["fop-asdl", *argv]),
        "python": sys.executable,
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "asdl": _version("asdfghjkl"),
            "numpy": np.__version__,
            "fop_asdl": __version__,
            "pytorch_optimizer": _version("pytorch-optimizer"),  # the baselines' libraries, when installed
            "schedulefree": _version("schedulefree"),
        },
        "git": git_state(PACKAGE_ROOT),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": {
            "torch": torch.get_num_threads(),
            "torch_interop": torch.get_num_interop_threads(),
            **{name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        },
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "world_size": world_size,
    }


def append_environment(out: Path, record: Dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ENVIRONMENT, "a") as f:
        f.write(json.dumps(record) + "\n")


def first_record(out: Path) -> Optional[Dict[str, Any]]:
    """The record of the process that started the study in ``out`` (None: no record there)."""
    path = out / ENVIRONMENT
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    return json.loads(lines[0]) if lines else None


def code_differences(first: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """What makes ``current`` compute differently from ``first``, in words: the library's code at its
    commit, its uncommitted changes, the torch thread count (a sum's order, so its last bits, depends on
    it), an arithmetic library's version. Records from before the library fields compare commit and
    dirty; an installed package (no git) compares fop_asdl's version."""
    out = []
    old, new = first.get("git"), current.get("git")
    if old and new and "library" in old and "library" in new:
        pairs = [("library commit", old["library"], new["library"]),
                 ("uncommitted library changes", old["library_changes"], new["library_changes"])]
    elif old and new:
        pairs = [("library commit", old["commit"], new["commit"]),
                 ("uncommitted library changes", old["dirty"], new["dirty"])]
    elif old or new:
        pairs = [("library commit", bool(old), bool(new))]  # a checkout against an installed package
    else:
        pairs = [("library version", first["versions"]["fop_asdl"], current["versions"]["fop_asdl"])]
    pairs.append(("torch threads", first["threads"]["torch"], current["threads"]["torch"]))
    versions = first["versions"], current["versions"]
    pairs += [(f"{name} version", versions[0][name], versions[1][name])
              for name in ARITHMETIC_LIBRARIES if name in versions[0] and name in versions[1]]
    return [what for what, a, b in pairs if a != b]


def git_state(root: Path) -> Optional[Dict[str, Any]]:
    """The git checkout at ``root``: ``commit``, ``dirty`` (tracked files differ from it), and the code that
    computes, the package folder: ``library`` (its tree at the commit: equal whatever else the commits
    changed) and ``library_changes`` (a hash of its uncommitted changes, untracked files included; None:
    none). None when ``root`` is not the top of a checkout (an installed package) or git is missing."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # an enclosing repository that is not this package's
        package = PACKAGE.relative_to(root).as_posix()
        changes = hashlib.sha256(git("diff", "HEAD", "--", package).encode())
        for name in git("ls-files", "--others", "--exclude-standard", "--", package).splitlines():
            changes.update(name.encode() + b"\0" + (root / name).read_bytes())
        changed = bool(git("status", "--porcelain", "--untracked-files=all", "--", package))
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                "library": git("rev-parse", f"HEAD:{package}"),
                "library_changes": changes.hexdigest()[:16] if changed else None}
    except (OSError, subprocess.SubprocessError):
        return None


def _version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    """``model name`` of /proc/cpuinfo (Linux), else what the platform module reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
