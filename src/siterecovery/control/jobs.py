"""Jobs: durable, observable operations with steps.

A job is a row (``jobs``) with a list of steps, each ``{"name", "state", "started_at",
"ended_at", "detail"}``. Jobs are created ``Queued`` by a command handler and run by the worker.
Every step records its end in the database, so a job interrupted by a crash or a kill is picked
up by the next worker start: steps already ``Succeeded`` are skipped and the interrupted step
runs again (each step is written to be safe to repeat, and long steps resume from their own
checkpoints). A job never hangs: a step that raises fails the job with the error's message.

Job states: Queued -> Running -> Succeeded | Failed | Cancelled (and Waiting for manual actions).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.adapters.db.models import JobRow
from siterecovery.errors import NotFound

QUEUED, RUNNING, WAITING, SUCCEEDED, FAILED, CANCELLED = (
    "Queued",
    "Running",
    "Waiting",
    "Succeeded",
    "Failed",
    "Cancelled",
)
FINAL = (SUCCEEDED, FAILED, CANCELLED)


def new_job(
    session: Session,
    kind: str,
    target: str,
    steps: list[str],
    *,
    item_id: int | None = None,
    params: dict[str, Any] | None = None,
) -> JobRow:
    job = JobRow(
        id=f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}",
        kind=kind,
        item_id=item_id,
        target=target,
        state=QUEUED,
        params=params or {},
        steps=[
            {"name": n, "state": "NotStarted", "started_at": None, "ended_at": None, "detail": None}
            for n in steps
        ],
        progress=0.0,
        created_at=time.time(),
    )
    session.add(job)
    session.flush()
    return job


def job_dict(job: JobRow) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "target": job.target,
        "state": job.state,
        "progress": round(job.progress, 4),
        "detail": job.detail,
        "error": job.error,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
        "duration_s": round((job.ended_at or time.time()) - job.started_at, 3) if job.started_at else None,
        "steps": job.steps,
        "params": job.params,
        "result": job.result,
    }


def get_job(session: Session, job_id: str) -> JobRow:
    job = session.get(JobRow, job_id)
    if job is None:
        raise NotFound(kind="job", name=job_id, hint=" 'siterecovery job list' shows the jobs.")
    return job


def list_jobs(vault: Any, *, target: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    with vault.store.uow() as s:
        q = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)
        if target:
            q = q.where(JobRow.target == target)
        return [job_dict(j) for j in s.scalars(q)]


def show_job(vault: Any, job_id: str) -> dict[str, Any]:
    with vault.store.uow() as s:
        return job_dict(get_job(s, job_id))


@dataclass
class JobContext:
    """What a job handler gets: the vault, its job's id, and step/progress bookkeeping."""

    vault: Any
    job_id: str
    cancel: threading.Event = field(default_factory=threading.Event)  # set when the worker stops
    _last_progress_write: float = 0.0

    def params(self) -> dict[str, Any]:
        with self.vault.store.uow() as s:
            return dict(get_job(s, self.job_id).params)

    def step_done(self, name: str) -> bool:
        with self.vault.store.uow() as s:
            return any(
                st["name"] == name and st["state"] == SUCCEEDED for st in get_job(s, self.job_id).steps
            )

    def _set_step(self, name: str, **changes: Any) -> None:
        with self.vault.store.uow() as s:
            job = get_job(s, self.job_id)
            steps = [dict(st) for st in job.steps]
            for st in steps:
                if st["name"] == name:
                    st.update(changes)
            job.steps = steps
            job.heartbeat_at = time.time()

    @contextmanager
    def step(self, name: str) -> Iterator[bool]:
        """Run one step; yields False when the step already succeeded (skip its body)."""
        if self.step_done(name):
            yield False
            return
        self._set_step(name, state=RUNNING, started_at=time.time(), ended_at=None, detail=None)
        try:
            yield True
        except InterruptedError:
            self._set_step(
                name, state="Interrupted", ended_at=time.time(), detail="resumes at the next start"
            )
            raise
        except BaseException as err:
            self._set_step(name, state=FAILED, ended_at=time.time(), detail=str(err) or type(err).__name__)
            raise
        self._set_step(name, state=SUCCEEDED, ended_at=time.time())

    def progress(self, fraction: float, detail: str | None = None, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress_write < 0.5:
            return
        self._last_progress_write = now
        with self.vault.store.uow() as s:
            job = get_job(s, self.job_id)
            job.progress = max(0.0, min(1.0, fraction))
            if detail is not None:
                job.detail = detail
            job.heartbeat_at = time.time()

    def set_result(self, **result: Any) -> None:
        with self.vault.store.uow() as s:
            job = get_job(s, self.job_id)
            job.result = {**(job.result or {}), **result}


Handler = Callable[[JobContext], None]
HANDLERS: dict[str, Handler] = {}


def handler(kind: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn

    return register


def claim(vault: Any, job_id: str) -> bool:
    """Mark a queued (or orphaned running) job as run by this process; False if someone else has it."""
    with vault.store.uow() as s:
        job = get_job(s, job_id)
        if job.state not in (QUEUED, RUNNING):
            return False
        if (
            job.state == RUNNING
            and job.worker_pid
            and pid_alive(job.worker_pid)
            and job.worker_pid != os.getpid()
        ):
            return False
        job.state = RUNNING
        job.worker_pid = os.getpid()
        job.started_at = job.started_at or time.time()
        job.heartbeat_at = time.time()
        return True


def finish(vault: Any, job_id: str, error: BaseException | None) -> None:
    with vault.store.uow() as s:
        job = get_job(s, job_id)
        job.ended_at = time.time()
        if error is None:
            job.state, job.progress, job.error = SUCCEEDED, 1.0, None
        else:
            job.state = FAILED
            job.error = str(error) or type(error).__name__


def run_job(vault: Any, job_id: str, cancel: threading.Event | None = None) -> None:
    """Run a claimed job to its end; failures are recorded on the job, never raised.

    When ``cancel`` is set (the worker is stopping) and the handler gives up because of it, the
    job stays Running: the next worker start resumes it from its last finished step.
    """
    with vault.store.uow() as s:
        kind = get_job(s, job_id).kind
    ctx = JobContext(vault=vault, job_id=job_id, cancel=cancel or threading.Event())
    try:
        HANDLERS[kind](ctx)
    except InterruptedError:
        if ctx.cancel.is_set():
            return
        raise
    except Exception as err:  # every failure ends up on the job row for the user to read
        finish(vault, job_id, err)
        return
    finish(vault, job_id, None)


def runnable_jobs(vault: Any) -> list[str]:
    with vault.store.uow() as s:
        rows = s.scalars(
            select(JobRow).where(JobRow.state.in_((QUEUED, RUNNING))).order_by(JobRow.created_at)
        )
        return [j.id for j in rows if j.state == QUEUED or not (j.worker_pid and pid_alive(j.worker_pid))]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited but not reaped) still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def wait_for(
    vault: Any,
    job_id: str,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Poll a job until it ends (for the CLI); returns its final record."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = show_job(vault, job_id)
        if on_update is not None:
            on_update(info)
        if info["state"] in FINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            return info
        time.sleep(0.3)
