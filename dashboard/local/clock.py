"""Time that every process on this machine agrees on, and who a process is.

Leases, heartbeats, rates and the per-second record must not follow the wall
clock: NTP or a VM resuming can step it by minutes, and a lease measured on
it then ends early (a live task runs twice) or late (a dead one waits). On
Linux ``CLOCK_BOOTTIME`` counts seconds since boot, never steps, keeps
counting through suspend and is the same in every process of the machine; a
reboot starts it again, so what is measured on it is stored with the boot id,
and a value from another boot is never compared with ours.

Where that clock is not available, the wall clock is used and the file's
guarantees are those of the wall clock (the README says so).

:func:`process_alive` answers whether a process that wrote to the queue file
still runs, on this machine and in this PID namespace, without trusting any
clock: the pid must exist and have started at the same tick.

This module imports nothing from Flask.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Callable, NamedTuple


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _fast(read: Callable[[], float]) -> Callable[[], float]:
    # A partial is called without a Python frame: the clock is read on every submit.
    return partial(time.clock_gettime, time.CLOCK_BOOTTIME) if read is _boottime else read


def _choose() -> tuple[Callable[[], float], str]:
    boot = _read("/proc/sys/kernel/random/boot_id")
    if boot and hasattr(time, "CLOCK_BOOTTIME"):
        try:
            _boottime()
        except OSError:
            pass
        else:
            return _boottime, boot
    return time.time, "wall"


#: Seconds on the machine's shared clock, and the boot they count from
#: (``"wall"`` when the shared clock is the wall clock).
clock, BOOT_ID = _choose()
clock = _fast(clock)


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def start_tick(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None if it is gone (or a zombie)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name sits in parentheses and may hold spaces: split after it.
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class Identity(NamedTuple):
    """Enough to tell, from another process on this machine, whether a process still runs."""

    boot: str
    pidns: str | None
    pid: int
    start: int | None


def identity() -> Identity:
    pid = os.getpid()
    return Identity(BOOT_ID, _pid_namespace(), pid, start_tick(pid))


ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"


def process_alive(other: Identity, me: Identity) -> str:
    """``ALIVE``, ``DEAD`` or ``UNKNOWN`` (then only a lease can tell) for ``other``.

    Another boot's process is dead. In our PID namespace of our boot, a pid
    that no longer exists, or that started at another tick (the pid was
    reused), is dead; one that exists with the same start is alive. Anything
    else (another container sharing the file, no /proc, our own pid: a second
    store object in this very process) is unknown.
    """
    if me.boot == "wall" or other.boot is None:
        return UNKNOWN
    if other.boot != me.boot:
        return DEAD
    if other.pidns is None or other.pidns != me.pidns or other.start is None:
        return UNKNOWN
    if start_tick(other.pid) != other.start:
        return DEAD
    return UNKNOWN if other.pid == me.pid else ALIVE
