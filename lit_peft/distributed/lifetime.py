"""No rank outlives a failed job on its machine.

A rank that stalls (rather than crashes) is ended by the process-group timeout of the other ranks (the strategy
overlays in ``configs/strategy/`` set 10 minutes instead of torch's 30); the rank that times out exits with an
error, but the stalled process would stay. So, once per process of a multi-process run:

- a rank started by a launcher on its machine (``LOCAL_RANK`` > 0: Lightning's subprocess launcher or torchrun)
  asks the kernel to kill it when its parent ends (``PR_SET_PDEATHSIG``, Linux);
- the local process that launched other ranks (Lightning's launcher runs in local rank 0) watches them: when one
  ends with an error, it ends the others and itself, exit code 1, saying which one failed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_started = False


def _children() -> list[int]:
    pids: list[int] = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return pids


def _is_rank(pid: int) -> bool:
    """A rank this process launched (started with ``LOCAL_RANK`` > 0 in its environment), not a DataLoader worker
    or another helper process (forked without a new environment)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    for item in env:
        if item.startswith(b"LOCAL_RANK="):
            try:
                return int(item.split(b"=", 1)[1] or 0) > 0
            except ValueError:
                return False
    return False


def _failed(pid: int) -> str | None:
    """How child ``pid`` ended if it ended with an error (peeked: the child is left for its owner to reap)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return None if info.si_status == 0 else f"exit code {info.si_status}"
    return f"signal {info.si_status}"


def _watch(interval: float) -> None:
    watched: set[int] = set()
    while True:
        watched |= {pid for pid in _children() if pid not in watched and _is_rank(pid)}
        for pid in sorted(watched):
            how = _failed(pid)
            if how is not None:
                others = [p for p in watched if p != pid]
                print(f"lit_peft: rank process {pid} of this job ended with {how}; ending its other local processes "
                      f"{others} and this one", file=sys.stderr, flush=True)
                for other in others:
                    try:
                        os.kill(other, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                os._exit(1)
        time.sleep(interval)


def end_with_job(world_size: int, interval: float = 1.0) -> None:
    """Set up the two guards above for this process (once; a no-op for one process or off Linux)."""
    global _started
    if _started or world_size <= 1 or not sys.platform.startswith("linux"):
        return
    _started = True
    if int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() == 1:  # the launcher ended before the guard was set
            os._exit(1)
    threading.Thread(target=_watch, args=(interval,), name="lit_peft-rank-watchdog", daemon=True).start()


__all__ = ["end_with_job"]
