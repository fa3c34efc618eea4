"""What a benchmark ran on (CPU, GPU, torch, cores, commit), for its results' ``meta``, and its
progress log on stderr."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def progress_log(prefix: str) -> Callable[[str], None]:
    """A ``log(msg)`` that prints ``[prefix HH:MM:SS] msg`` to stderr (stdout is the table)."""
    def log(msg: str) -> None:
        print(f"[{prefix} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    return log


def cores() -> int:
    return len(os.sched_getaffinity(0))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def gpu_name() -> Optional[str]:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def torch_threads() -> int:
    """Intra-op threads a fresh torch process gets here (what the servers use by default)."""
    import torch

    return torch.get_num_threads()


def torch_version() -> str:
    import torch

    return torch.__version__


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=REPO, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def client_http_backend() -> str:
    """What the benchmark's callers send through: AsyncHeroClient's "auto" backend here."""
    from hero_client._transport import resolve_backend

    return resolve_backend("auto")
