"""The worker: runs jobs and the replication schedule of one vault.

One worker per vault (an exclusive lock on ``run/worker.lock``). The CLI starts it in the
background when it is needed (``ensure_worker``), so an embedded vault needs no server started
by hand. On start the worker picks up jobs that were queued, and jobs left ``Running`` by a
worker that died; those resume from their last finished step (see ``control.jobs``).

Schedule: every item that replicates (Protected, and during a test failover) gets a
crash-consistent point every ``crash_interval`` of its policy, and an app-consistent one every
``app_interval``; a failed cycle is retried at the next interval and counted for health. Policy
changes apply at the next cycle because the policy is read each time. An initial replication
whose attempt failed is queued again (a new enable job that resumes from the item's checkpoint)
after a delay that doubles with each failure, up to 10 minutes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from siterecovery.adapters.db.models import ItemRow, JobRow
from siterecovery.control import jobs
from siterecovery.control.maintenance import run_gc
from siterecovery.control.protection import ENABLE_STEPS
from siterecovery.control.replication import record_failure, take_point
from siterecovery.domain.states import ItemState
from siterecovery.errors import VaultError

log = logging.getLogger("siterecovery.worker")

REPLICATING = (
    ItemState.PROTECTED,
    ItemState.TEST_FAILOVER,
    ItemState.STARTING_TEST_FAILOVER,
    ItemState.CLEANING_UP_TEST_FAILOVER,
)
GC_EVERY_S = 3600.0
GC_GRACE_S = 6 * 3600.0
INITIAL_RETRY_MAX_S = 600.0


class Worker:
    def __init__(self, vault: Any, tick: float = 0.25) -> None:
        self.vault = vault
        self.tick = tick
        self.stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._next_app_try: dict[str, float] = {}
        self._lock_fd: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def acquire(self) -> None:
        run = Path(self.vault.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / "worker.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise VaultError(f"another worker already runs for the vault at {self.vault.root}.") from err
        self._lock_fd = fd
        tmp = run / "worker.pid.tmp"
        tmp.write_text(str(os.getpid()))
        tmp.replace(run / "worker.pid")

    def release(self) -> None:
        if self._lock_fd is not None:
            (Path(self.vault.run_dir) / "worker.pid").unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def run_forever(self) -> None:
        self.acquire()
        log.info("worker %d started for vault %s", os.getpid(), self.vault.root)
        last_gc = time.monotonic()
        try:
            while not self.stop.is_set():
                self._reap()
                self._start_jobs()
                self._schedule_cycles()
                self._retry_initial_replication()
                if time.monotonic() - last_gc > GC_EVERY_S:
                    self._start("gc", self._gc)
                    last_gc = time.monotonic()
                self.stop.wait(self.tick)
            for t in list(self._threads.values()):
                t.join(timeout=60)
        finally:
            self.release()
            log.info("worker %d stopped", os.getpid())

    # -- work -----------------------------------------------------------------------------------

    def _reap(self) -> None:
        for key, t in list(self._threads.items()):
            if not t.is_alive():
                del self._threads[key]

    def _start(self, key: str, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name=key, daemon=True)
        self._threads[key] = t
        t.start()

    def _start_jobs(self) -> None:
        for job_id in jobs.runnable_jobs(self.vault):
            key = f"job:{job_id}"
            if key in self._threads:
                continue
            if jobs.claim(self.vault, job_id):
                log.info("running job %s", job_id)
                self._start(key, jobs.run_job, self.vault, job_id, self.stop)

    def _schedule_cycles(self) -> None:
        now = time.time()
        with self.vault.store.uow() as s:
            items = [
                (
                    i.name,
                    i.last_point_at,
                    i.last_attempt_at,
                    i.last_app_point_at,
                    i.policy.crash_interval_s,
                    i.policy.app_interval_s,
                    i.consecutive_failures,
                )
                for i in s.scalars(select(ItemRow).where(ItemRow.state.in_([st.value for st in REPLICATING])))
            ]
        for name, last, attempt, last_app, crash_s, app_s, failures in items:
            key = f"cycle:{name}"
            if key in self._threads:
                continue
            due = (last or 0) + crash_s
            if failures and attempt:
                due = max(due, attempt + min(crash_s, 30.0))
            if now < due:
                continue
            app = bool(app_s) and now - (last_app or 0) >= app_s and now >= self._next_app_try.get(name, 0)
            if app:
                self._next_app_try[name] = now + min(app_s, 600.0)
            self._start(key, self._cycle, name, app)

    def _retry_initial_replication(self) -> None:
        """Queue the initial replication again for items whose enable job failed in it.

        Initial replication does not fail as a whole (see ``domain.states``): a failed attempt
        (source unreachable, datastore full) is retried, resuming from the item's checkpoint,
        after a delay that doubles with each failure up to ``INITIAL_RETRY_MAX_S``.
        """
        now = time.time()
        with self.vault.store.uow() as s:
            for item in s.scalars(
                select(ItemRow).where(
                    ItemRow.state.in_((ItemState.ENABLING.value, ItemState.INITIAL_REPLICATION.value)),
                    ItemRow.consecutive_failures > 0,
                )
            ):
                active = s.scalar(
                    select(JobRow.id).where(
                        JobRow.item_id == item.id,
                        JobRow.state.in_((jobs.QUEUED, jobs.RUNNING, jobs.WAITING)),
                    )
                )
                if active is not None:
                    continue
                first = min(item.policy.crash_interval_s, 30.0)
                delay = min(INITIAL_RETRY_MAX_S, first * 2 ** min(item.consecutive_failures - 1, 10))
                if now < (item.last_attempt_at or 0) + delay:
                    continue
                job = jobs.new_job(
                    s, "enable-replication", item.name, ENABLE_STEPS, item_id=item.id, params={"retry": True}
                )
                log.info("%s: initial replication queued again as job %s", item.name, job.id)

    def _cycle(self, name: str, app: bool) -> None:
        try:
            r = take_point(self.vault, name, app=app, cancel=self.stop)
            log.info(
                "%s: point %s (%s, %s) sent %d bytes in %.2fs%s",
                name,
                r.point_id,
                r.consistency,
                r.method,
                r.stats.bytes_sent,
                r.duration_s,
                f" warning: {r.warning}" if r.warning else "",
            )
        except InterruptedError:
            log.info("%s: cycle interrupted by shutdown; its changes stay tracked", name)
        except Exception as err:  # recorded on the item; health shows it
            log.warning("%s: replication cycle failed: %s", name, err)
            record_failure(self.vault, name, err)

    def _gc(self) -> None:
        try:
            stats = run_gc(self.vault, GC_GRACE_S)
            log.info("garbage collection: %s", stats)
        except Exception as err:
            log.warning("garbage collection failed: %s", err)


# -- starting and stopping the background worker -----------------------------------------------


def worker_pid(vault: Any) -> int | None:
    pidfile = Path(vault.run_dir) / "worker.pid"
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return None
    return pid if jobs.pid_alive(pid) else None


def ensure_worker(vault: Any, timeout: float = 20.0) -> int:
    """Start the vault's worker in the background unless it runs; return its pid."""
    pid = worker_pid(vault)
    if pid:
        return pid
    run = Path(vault.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "worker.log", "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "siterecovery.entrypoints.worker", "--vault", str(vault.root)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = worker_pid(vault)
        if pid:
            return pid
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise VaultError(f"the worker did not start; see {run / 'worker.log'}.")


def stop_worker(vault: Any, timeout: float = 60.0) -> bool:
    pid = worker_pid(vault)
    if not pid:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and jobs.pid_alive(pid):
        time.sleep(0.1)
    if jobs.pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True
