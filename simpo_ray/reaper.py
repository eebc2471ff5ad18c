"""A private Ray cluster ends with its driver, even when the driver is SIGKILLed.

``ray.shutdown()`` stops what ``ray.init`` started, but a driver killed by SIGKILL (the
OOM killer, a scheduler's hard kill, ``kill -9``) never runs it, and Ray's own fate
sharing leaves processes behind (seen: two agent processes of the raylet, alive long
after the driver). ``start(session)`` launches a watcher in a session of its own:
while the driver lives it records, every second, the driver's processes of that Ray
session (a command line that names the session, and their descendants); once the
driver is gone it sends SIGTERM to the recorded ones still running (the same pid and
start time, never a recycled pid), SIGKILL to what is left after a grace period, and
exits. On a normal exit ``ray.shutdown`` has stopped them all and there is nothing to do.

Run as ``python -m simpo_ray.reaper DRIVER_PID DRIVER_START SESSION``; it imports only
psutil (a Ray dependency).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 5.0


def start(session: str) -> subprocess.Popen:
    """Watch this process (the driver) and reap its processes of Ray session ``session``
    (e.g. ``session_2026-12-03_15-01-19_123456_789``) when it dies."""
    import psutil

    me = psutil.Process()
    return subprocess.Popen([sys.executable, "-m", "simpo_ray.reaper", str(me.pid), repr(me.create_time()), session],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def session_processes(driver, session: str) -> dict:
    """{pid: start time} of the driver's descendants that belong to ``session``."""
    import psutil

    out, me = {}, os.getpid()
    for p in driver.children(recursive=True):
        try:
            if p.pid != me and p.pid not in out and any(session in a for a in p.cmdline()):
                for q in [p, *p.children(recursive=True)]:
                    if q.pid != me:
                        out[q.pid] = q.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def alive(pid: int, started: float) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def reap(recorded: dict, grace_s: float = GRACE_S) -> list:
    """SIGTERM the recorded processes still running, then SIGKILL the rest after
    ``grace_s``; returns the pids that had to be stopped."""
    import psutil

    procs = []
    for pid, started in recorded.items():
        if alive(pid, started):
            try:
                p = psutil.Process(pid)
                p.terminate()
                procs.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(left, timeout=grace_s)
    return [p.pid for p in procs]


def watch(driver_pid: int, driver_start: float, session: str, poll_s: float = POLL_S) -> list:
    """Record while the driver lives; reap when it is gone. Returns the reaped pids."""
    import psutil

    recorded = {}
    while alive(driver_pid, driver_start):
        try:
            now = session_processes(psutil.Process(driver_pid), session)
        except psutil.NoSuchProcess:
            break
        recorded = {pid: t for pid, t in {**recorded, **now}.items() if alive(pid, t)}
        time.sleep(poll_s)
    return reap(recorded)


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
