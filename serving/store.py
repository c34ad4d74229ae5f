"""Jobs and their states in a real database through SQLAlchemy 2: a SQLite file by default, any URL on a cluster.

A job moves queued -> running -> succeeded | failed | cancelled. Every start of a job (a claim) counts an attempt,
and the runner writes with its attempt number: a run that was superseded (its job requeued after a restart) can
no longer change the job, and learns from its next progress report that it should stop.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

logger = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class QueueFull(Exception):
    """The queue holds max_queued jobs already."""


class IdempotencyConflict(Exception):
    """An idempotency key that the same owner already used for a different request."""


@dataclass(frozen=True)
class StepProgress:
    clip: int
    clips: int
    step: int
    steps: int
    percent: float


class _Base(DeclarativeBase):
    pass


class Job(_Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="one_job_per_owner_key"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # submission order
    id: Mapped[str] = mapped_column(String(32), unique=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_digest: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.QUEUED)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the GenerationJob, input paths relative to the job's files
    clip: Mapped[int] = mapped_column(Integer, default=0)
    clips: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    percent: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class StoredFile(_Base):
    """A file uploaded through /v1/files (its bytes live in the storage under files/<id>)."""

    __tablename__ = "files"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def _now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time stored here is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _serialise_sqlite_writes(engine) -> None:
    """WAL, a busy timeout and BEGIN IMMEDIATE: several processes write one SQLite file without lock errors, and a
    check-then-insert (the queue bound) holds the write lock from its first read."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" hook below open transactions
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: an application crash loses nothing, only a power cut may
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class JobStore:
    """The job table: submission, claims by runners, progress, cancellation and requeue after a restart."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            # A fresh machine has no folder for the database file yet; SQLite creates the file, not its folder.
            Path(self.engine.url.database).parent.mkdir(parents=True, exist_ok=True)
            _serialise_sqlite_writes(self.engine)
        _Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    # ------------------------------------------------------------------------------------------------ callers

    def find(self, owner: str, idempotency_key: str) -> Job | None:
        """The owner's job submitted with this idempotency key, if any."""
        with self._session() as session:
            return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key))

    def submit(
        self,
        job_id: str,
        owner: str,
        spec: dict[str, Any],
        request_digest: str,
        idempotency_key: str | None = None,
        max_queued: int | None = None,
    ) -> tuple[Job, bool]:
        """Queues a job; returns it and True, or the owner's job with the same idempotency key and False.

        Raises QueueFull when max_queued jobs are waiting, IdempotencyConflict when the key was used for another
        request. (On SQLite the bound is exact; on a server database at READ COMMITTED concurrent submissions may
        each see the last free place.)
        """
        try:
            with self._session.begin() as session:
                queued = session.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED))
                if max_queued is not None and queued >= max_queued:
                    raise QueueFull(f"{queued} jobs are waiting (max_queued_jobs = {max_queued})")
                job = Job(
                    id=job_id,
                    owner=owner,
                    idempotency_key=idempotency_key,
                    request_digest=request_digest,
                    state=JobState.QUEUED,
                    spec=spec,
                    created_at=_now(),
                )
                session.add(job)
            return job, True
        except IntegrityError:
            # Two requests with one key raced: the first one's job stands.
            if idempotency_key is None:
                raise
            existing = self.find(owner, idempotency_key)
            if existing is None:
                raise
            return self.replay(existing, request_digest), False

    @staticmethod
    def replay(job: Job, request_digest: str) -> Job:
        """The job an idempotent retry gets back; raises IdempotencyConflict when the request differs."""
        if job.request_digest != request_digest:
            raise IdempotencyConflict(
                f"Idempotency-Key {job.idempotency_key!r} was already used for a different request (job {job.id})"
            )
        return job

    def get(self, job_id: str) -> Job | None:
        with self._session() as session:
            return session.scalar(select(Job).where(Job.id == job_id))

    def list_jobs(self, owner: str, limit: int, after: Job | None = None, newest_first: bool = True) -> list[Job]:
        """The owner's jobs in submission order (newest first by default), `limit` of them after the job `after`."""
        order = Job.seq.desc() if newest_first else Job.seq.asc()
        query = select(Job).where(Job.owner == owner).order_by(order).limit(limit)
        if after is not None:
            query = query.where(Job.seq < after.seq if newest_first else Job.seq > after.seq)
        with self._session() as session:
            return list(session.scalars(query))

    def delete(self, job_id: str) -> bool:
        """Removes a finished job; False when it is not finished (or gone)."""
        with self._session.begin() as session:
            return bool(session.execute(sql_delete(Job).where(Job.id == job_id, Job.state.in_(FINISHED))).rowcount)

    # -------------------------------------------------------------------------------------------------- files

    def add_file(self, file_id: str, owner: str, filename: str, purpose: str, size: int) -> StoredFile:
        record = StoredFile(id=file_id, owner=owner, filename=filename, purpose=purpose, bytes=size, created_at=_now())
        with self._session.begin() as session:
            session.add(record)
        return record

    def get_file(self, file_id: str) -> StoredFile | None:
        with self._session() as session:
            return session.scalar(select(StoredFile).where(StoredFile.id == file_id))

    def list_files(self, owner: str) -> list[StoredFile]:
        with self._session() as session:
            query = select(StoredFile).where(StoredFile.owner == owner).order_by(StoredFile.seq.desc())
            return list(session.scalars(query))

    def delete_file(self, file_id: str) -> bool:
        with self._session.begin() as session:
            return bool(session.execute(sql_delete(StoredFile).where(StoredFile.id == file_id)).rowcount)

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled now; a running one is asked to stop at its next step; a finished one stays."""
        with self._session.begin() as session:
            job = session.scalar(select(Job).where(Job.id == job_id))
            if job is None:
                return None
            if job.state == JobState.QUEUED:
                job.state, job.finished_at = JobState.CANCELLED, _now()
            elif job.state == JobState.RUNNING:
                job.cancel_requested = True
        return job

    def state_counts(self) -> dict[str, int]:
        with self._session() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state))
            return {state: count for state, count in rows}

    def mean_run_seconds(self, last: int = 20) -> float | None:
        """Mean start-to-finish time of the last succeeded jobs (None before the first one)."""
        query = (
            select(Job.started_at, Job.finished_at)
            .where(Job.state == JobState.SUCCEEDED)
            .order_by(Job.seq.desc())
            .limit(last)
        )
        with self._session() as session:
            spans = [(as_utc(end) - as_utc(start)).total_seconds() for start, end in session.execute(query)]
        return sum(spans) / len(spans) if spans else None

    def ping(self) -> None:
        """Raises when the database cannot be reached."""
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    # ----------------------------------------------------------------------------------------- the dispatcher

    def queued(self) -> list[str]:
        """Ids of the waiting jobs, oldest first."""
        with self._session() as session:
            return list(session.scalars(select(Job.id).where(Job.state == JobState.QUEUED).order_by(Job.seq)))

    def requeue(self, job_ids: list[str] | None, max_attempts: int, reason: str) -> tuple[list[str], list[str]]:
        """Running jobs (these, or all when None) whose runner is gone go back to the queue, or fail once they
        were started max_attempts times. Returns the requeued and the failed ids."""
        requeued, failed = [], []
        with self._session.begin() as session:
            query = select(Job).where(Job.state == JobState.RUNNING)
            if job_ids is not None:
                query = query.where(Job.id.in_(job_ids))
            for job in session.scalars(query):
                if job.cancel_requested:
                    job.state, job.finished_at = JobState.CANCELLED, _now()
                elif job.attempts >= max_attempts:
                    job.state, job.finished_at = JobState.FAILED, _now()
                    job.error = f"stopped {job.attempts} times while running ({reason}); not retried again"
                    failed.append(job.id)
                else:
                    job.state = JobState.QUEUED
                    requeued.append(job.id)
        return requeued, failed

    # -------------------------------------------------------------------------------------------- the runner

    def claim(self, job_id: str) -> Job | None:
        """Starts a queued job (one attempt more) and returns it; None when it is not queued any more."""
        with self._session.begin() as session:
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.QUEUED)
                .values(state=JobState.RUNNING, attempts=Job.attempts + 1, started_at=_now(), error=None)
            ).rowcount
            return session.scalar(select(Job).where(Job.id == job_id)) if claimed else None

    def report(self, job_id: str, attempt: int, progress: StepProgress) -> bool:
        """Records progress; returns whether the run should go on (False: cancelled, or superseded)."""
        with self._session.begin() as session:
            current = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.attempts == attempt, Job.state == JobState.RUNNING)
                .values(
                    clip=progress.clip,
                    clips=progress.clips,
                    step=progress.step,
                    steps=progress.steps,
                    percent=progress.percent,
                )
            ).rowcount
            if not current:
                return False
            return not session.scalar(select(Job.cancel_requested).where(Job.id == job_id))

    def end(
        self,
        job_id: str,
        attempt: int,
        state: JobState,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> bool:
        """Ends a run as succeeded, failed or cancelled; False when the run had been superseded."""
        with self._session.begin() as session:
            return bool(
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.attempts == attempt, Job.state == JobState.RUNNING)
                    .values(state=state, error=error, result=result, finished_at=_now())
                ).rowcount
            )
