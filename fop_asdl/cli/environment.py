"""What a result was produced with: package versions and commit, CPU/GPU, threads, device, exact command.

Seconds depend on all of these (and on other load on the machine), and a result is only reproducible with
the same code: every results folder appends one record per command that worked on it (a study resumed
three times has three), and every run's ``summary.json`` carries the record of the process that wrote it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .. import __version__

__all__ = ["ENVIRONMENT", "describe_environment", "append_environment", "git_state"]

ENVIRONMENT = "environment.jsonl"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding fop_asdl/, when run from one


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


def git_state(root: Path) -> Optional[Dict[str, Any]]:
    """``{"commit", "dirty"}`` of the git checkout at ``root`` (dirty: tracked files differ from the
    commit); None when ``root`` is not the top of a checkout (an installed package) or git is missing."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # an enclosing repository that is not this package's
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
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
