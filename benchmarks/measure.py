"""Run one command and report what it cost: the measuring wrapper of the benchmarks.

Usage (the benchmark runs it; it is not meant to be typed)::

    python benchmarks/measure.py --out RESULT.json [--stdout FILE] [--stderr FILE] -- CMD ARG...

The wrapper forks, execs ``CMD`` and waits for it with ``os.wait4``. It measures the whole
process tree of the command, i.e. the command and every descendant it reaped:

=====================  ======================================================================
figure                 where it comes from
=====================  ======================================================================
``wall_s``             ``time.monotonic()`` from just before the fork to just after the reap
``user_s``/``sys_s``   ``ru_utime``/``ru_stime`` of ``wait4``: the child plus its reaped
                       descendants
``maxrss_kib``         ``ru_maxrss`` of ``wait4``: the largest resident set of any ONE process
                       of the tree (Linux reports a maximum, not a sum)
``io``                 delta of the wrapper's own ``/proc/self/io`` across the wait. When a
                       process is reaped Linux adds its I/O counters (and those of the
                       descendants it reaped) to its parent's, so the delta is the tree's I/O.
                       The wrapper does no I/O of its own meanwhile (it is blocked in wait4).
=====================  ======================================================================

``io`` holds the kernel's counters as they are: ``rchar``/``wchar`` count every read/write
system call (files, pipes and sockets alike, page cache hits included); ``read_bytes`` counts
bytes fetched from the storage device (page-cache misses only); ``write_bytes`` counts bytes
the tree caused to be written to storage (at the time the pages were dirtied);
``cancelled_write_bytes`` counts dirtied bytes that were truncated away before writeback.

Descendants that the command does not reap (daemons that detach) are not counted; none of the
benchmarked tools leaves any.

Result file (JSON, written atomically)::

    {"cmd": [...], "exit": <int>, "wall_s": <float>, "user_s": <float>, "sys_s": <float>,
     "maxrss_kib": <int>, "io": {"rchar": <int>, "wchar": <int>, "read_bytes": <int>,
     "write_bytes": <int>, "cancelled_write_bytes": <int>, "syscr": <int>, "syscw": <int>}}

``exit`` is the exit status, or minus the signal number that killed the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def read_io(path: str = "/proc/self/io") -> dict[str, int]:
    """The kernel's I/O counters of a process (``/proc/<pid>/io``) as integers."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(":")
            if value.strip():
                out[name.strip()] = int(value)
    return out


def _open_out(path: str | None) -> int:
    if path is None:
        return os.open(os.devnull, os.O_WRONLY)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def run(cmd: list[str], stdout: str | None, stderr: str | None) -> dict[str, object]:
    out_fd, err_fd = _open_out(stdout), _open_out(stderr)
    before = read_io()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child: wire stdio, then become the command
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_fd, 1)
            os.dup2(err_fd, 2)
            os.execvp(cmd[0], cmd)
        except OSError as err:
            os.write(2, f"measure: cannot run {cmd[0]}: {err}\n".encode())
        os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    after = read_io()
    os.close(out_fd)
    os.close(err_fd)
    return {
        "cmd": cmd,
        "exit": os.waitstatus_to_exitcode(status),
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "maxrss_kib": usage.ru_maxrss,
        "io": {name: after[name] - before.get(name, 0) for name in after},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run a command and measure its process tree")
    p.add_argument("--out", required=True, help="where to write the JSON result")
    p.add_argument("--stdout", help="file for the command's standard output (default: discarded)")
    p.add_argument("--stderr", help="file for the command's standard error (default: discarded)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("give the command to run after --")
    result = run(cmd, a.stdout, a.stderr)
    out = Path(a.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
