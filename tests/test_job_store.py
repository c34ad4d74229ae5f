"""The job store on a SQLite file: attempts, requeue after a restart, the queue bound and idempotency keys."""

import pytest

from serving.store import IdempotencyConflict, JobState, JobStore, QueueFull, StepProgress

SPEC = {"image": "inputs/image.png", "persons": [{"audio": "inputs/audio1.wav"}], "prompt": ""}
HALFWAY = StepProgress(clip=1, clips=1, step=1, steps=2, percent=50.0)


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")


def test_a_run_superseded_by_a_restart_can_neither_report_nor_end_the_job(store):
    store.submit("job", "owner", SPEC, "digest")
    first = store.claim("job").attempts
    assert store.requeue(None, max_attempts=3, reason="the application stopped") == (["job"], [])
    second = store.claim("job").attempts

    assert (first, second) == (1, 2)
    assert store.report("job", first, HALFWAY) is False  # the old run learns to stop
    assert store.end("job", first, JobState.SUCCEEDED) is False
    assert store.report("job", second, HALFWAY) is True
    assert store.end("job", second, JobState.SUCCEEDED, result={"num_frames": 5})
    assert store.get("job").state == JobState.SUCCEEDED and store.get("job").percent == 50.0


def test_a_job_interrupted_max_attempts_times_fails_saying_why(store):
    store.submit("job", "owner", SPEC, "digest")
    for _ in range(2):
        store.claim("job")
        requeued, failed = store.requeue(["job"], max_attempts=2, reason="generator stopped: node lost")
    assert (requeued, failed) == ([], ["job"])
    job = store.get("job")
    assert job.state == JobState.FAILED
    assert job.error == "stopped 2 times while running (generator stopped: node lost); not retried again"


def test_cancelling_a_queued_job_ends_it_and_a_running_one_asks_it_to_stop(store):
    store.submit("queued", "owner", SPEC, "a")
    store.submit("running", "owner", SPEC, "b")
    attempt = store.claim("running").attempts

    assert store.cancel("queued").state == JobState.CANCELLED
    assert store.claim("queued") is None  # a generator that gets it later leaves it alone
    assert store.cancel("running").state == JobState.RUNNING
    assert store.report("running", attempt, HALFWAY) is False


def test_the_queue_bound_counts_waiting_jobs_only(store):
    store.submit("a", "owner", SPEC, "a", max_queued=2)
    store.submit("b", "owner", SPEC, "b", max_queued=2)
    with pytest.raises(QueueFull, match="2 jobs are waiting"):
        store.submit("c", "owner", SPEC, "c", max_queued=2)
    store.claim("a")
    store.submit("c", "owner", SPEC, "c", max_queued=2)


def test_an_idempotency_key_is_unique_per_owner(store):
    job, created = store.submit("a", "alice", SPEC, "digest", idempotency_key="k")
    again, created_again = store.submit("b", "alice", SPEC, "digest", idempotency_key="k")
    assert created and not created_again and again.id == "a"
    with pytest.raises(IdempotencyConflict, match="'k' was already used for a different request"):
        store.submit("c", "alice", SPEC, "other digest", idempotency_key="k")
    assert store.submit("d", "bob", SPEC, "digest", idempotency_key="k")[1]
