"""Keeping a healing run whole: one run per ``out_dir``, and no rank outliving its launcher.

* :func:`acquire_lock` / :func:`release_lock`: ``out_dir/.heal.lock`` holds the pid and host of
  the run that owns the directory, created atomically (``O_EXCL``). A second run on the same
  ``out_dir`` is refused while that process lives; a lock left by a dead process is cleared.
* :func:`die_with_parent`: Linux's ``PR_SET_PDEATHSIG``: the calling process gets a signal
  when its parent dies. :func:`compactify.heal.launch` sets it for ``torchrun`` (SIGTERM, which
  torchrun passes on to its ranks) and every rank sets it for itself (SIGKILL when its torchrun
  agent dies), so a launcher stopped by any signal -- SIGKILL of its process group included,
  which the ranks' own sessions would not receive -- leaves no rank training and writing
  checkpoints into a directory that a resumed run then shares.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .heal_data import HealError

LOCK = ".heal.lock"
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux only; a no-op
    returning False elsewhere). Exits at once if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(out_dir: Path, pid: int | None = None) -> Path:
    """Take ``out_dir/.heal.lock`` for ``pid`` (default: this process), or refuse with the holder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, pid, host = out_dir / LOCK, int(pid or os.getpid()), socket.gethostname()
    record = json.dumps({"pid": pid, "host": host, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
            except (OSError, ValueError):
                held = {}
            if held.get("host") not in (None, host):
                raise HealError(f"{out_dir} is held by a healing run on host {held['host']} (pid {held.get('pid')}), "
                                f"per {path}. Wait for it, use another heal out_dir, or delete {path} if that run "
                                "is known to be dead.") from None
            if held.get("pid") and _alive(int(held["pid"])):
                raise HealError(f"{out_dir} is held by a live healing run (pid {held['pid']} on {host}, since "
                                f"{held.get('since')}): two runs in one out_dir would overwrite each other's "
                                "checkpoints. Wait for it to finish, stop it, or use another out_dir.") from None
            path.unlink(missing_ok=True)  # left by a run that died: clear it and try once more
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(record)
        return path
    raise HealError(f"Could not take the lock {path}: another run keeps creating it.")


def release_lock(out_dir: Path, pid: int | None = None) -> None:
    """Remove the lock if ``pid`` (default: this process) holds it."""
    path = Path(out_dir) / LOCK
    try:
        if json.loads(path.read_text()).get("pid") == int(pid or os.getpid()):
            path.unlink()
    except (OSError, ValueError):
        pass
