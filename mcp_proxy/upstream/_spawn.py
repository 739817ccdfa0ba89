"""
Process-level helpers for stdio upstreams: the exec wrapper that puts a
child in its own session, and process-group signalling and reaping.

C{reactor.spawnProcess} has no pre-exec hook, so the child is started as a
few lines of Python that call C{os.setsid()} and then C{os.execv()} the
real command.  The freshly spawned child is never a process-group leader,
so C{setsid} succeeds and the exec keeps the PID that Twisted tracks; the
PID is then also the process group id.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import sys
from typing import Mapping, Optional, Sequence

# Exit statuses of the wrapper when the command cannot be executed, as a
# shell uses them.
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

# Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec, so the
# wrapper restores their default before starting the command.  In the C
# locale Python also sets LC_CTYPE (PEP 538): the wrapper removes it unless
# it was given (first argument "1").
_WRAPPER_CODE = """\
import os, signal, sys
for name in ("SIGPIPE", "SIGXFSZ"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
if sys.argv[1] != "1":
    os.environ.pop("LC_CTYPE", None)
try:
    os.setsid()
except OSError:
    pass
try:
    os.execv(sys.argv[2], sys.argv[3:])
except OSError as e:
    sys.stderr.write("mcp-proxy: cannot execute %s: %s\\n" % (sys.argv[2], e.strerror))
    sys.stderr.flush()
    os._exit(126 if isinstance(e, PermissionError) else 127)
"""


def wrapperArgv(executable: str, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """
    The argument list that runs C{argv} (whose first item is the program
    name the command sees) from the absolute C{executable} in a new
    session.

    @param env: the child's environment.
    @return: a list whose first item is the absolute path to spawn.
    """
    python = sys.executable or shutil.which("python3") or ""
    if python:
        keep = "1" if "LC_CTYPE" in env else "0"
        return [python, "-I", "-S", "-c", _WRAPPER_CODE, keep, executable, *argv]
    setsid = shutil.which("setsid")
    if setsid:
        # setsid(1) forks only when it is a group leader, which a freshly
        # spawned child never is; it loses argv[0], which few commands need.
        return [setsid, executable, *argv[1:]]
    return [executable, *argv]


def signalGroup(pid: int, sig: int) -> bool:
    """
    Send C{sig} to the process group led by C{pid}; to C{pid} alone if it
    has not yet made its group.

    @return: whether any process was there to receive it.
    """
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        pass
    except PermissionError:
        return True
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def reapGroup(pgid: int) -> None:
    """
    Reap the exited members of process group C{pgid} that are children of
    this process (orphans reparented to it when it is a subreaper).  Only
    call it after the group leader itself has been reaped by Twisted.
    """
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        except OSError:
            return
        if pid == 0:
            return


def liveGroupMembers(pgid: int) -> Optional[list[int]]:
    """
    The PIDs of the processes of group C{pgid} that are not zombies, read
    from C{/proc}; C{None} where C{/proc} cannot tell.
    """
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parens.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 3:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(name))
    return members


def groupAlive(pgid: int) -> bool:
    """
    Whether process group C{pgid} still has a running (non-zombie) member.
    Exited members that are our children are reaped first.
    """
    reapGroup(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = liveGroupMembers(pgid)
    if members is None or members:
        return True
    # Members may have become zombies since the first reap: reap them now,
    # so that none is left behind once the group counts as gone.
    reapGroup(pgid)
    return False


_PR_SET_CHILD_SUBREAPER = 36


def setSubreaper(enabled: bool = True) -> bool:
    """
    Make this process the reaper of its orphaned descendants (Linux
    C{PR_SET_CHILD_SUBREAPER}), so that the members of an upstream's group
    that outlive its leader are reaped by L{reapGroup} rather than left as
    zombies under an init that does not reap.  Process-wide: the owner of
    the proxy process decides.

    @return: whether the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


__all__ = [
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "groupAlive",
    "liveGroupMembers",
    "reapGroup",
    "setSubreaper",
    "signalGroup",
    "wrapperArgv",
]
