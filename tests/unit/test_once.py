"""Run once, result once: admission decisions over the in-memory state store, a fake clock."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from structlog.testing import capture_logs

from fleet.app import broker_transport_options
from fleet.execution import ClaimOutcome, MemoryExecutionStore, state_url
from fleet.settings import Settings
from workers.claims import ClaimKeeper, ClaimRefresher, process_refresher
from workers.lease import LeaseExtender, unacked_index_key
from workers.once import Admission, OncePolicy, Verdict, admit, backoff_s, decide


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        """Start at t = 1000."""
        self.t = 1000.0

    def __call__(self) -> float:
        """Now."""
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryExecutionStore:
    return MemoryExecutionStore(clock)


def go(store, holder="a", *, ttl=10.0, limit=3):
    return admit(store, "t1", holder, ttl_s=ttl, max_attempts=limit)


def test_first_delivery_runs_as_attempt_one(store):
    """A fresh task id is claimed and run as attempt 1."""
    adm = go(store)
    assert (adm.verdict, adm.attempt) == (Verdict.RUN, 1)
    assert store.claim_ttl_s("t1") == 10.0


def test_redelivery_of_a_completed_task_returns_the_recorded_result(store):
    """Once a result is recorded, a redelivery gets it back and does not run."""
    assert go(store).verdict is Verdict.RUN
    store.finish("t1", "a", {"answer": 42})
    adm = go(store, "b")
    assert adm.verdict is Verdict.COMPLETED
    assert adm.result == {"answer": 42}
    assert store.counts("t1") == (2, 1)  # every delivery counted, one attempt


def test_duplicate_while_the_claim_is_live_is_not_run(store, clock):
    """A second delivery while the first holds the claim is a duplicate told when to look again."""
    go(store, "a")
    clock.t += 4
    adm = go(store, "b")
    assert adm.verdict is Verdict.DUPLICATE
    assert adm.wait_s == pytest.approx(6.0)


def test_a_refreshed_claim_stays_held(store, clock):
    """The holder's refresh keeps others out past the original TTL; a stranger cannot refresh it."""
    go(store, "a")
    clock.t += 8
    assert store.refresh("t1", "a", 10.0)
    assert not store.refresh("t1", "b", 10.0)
    clock.t += 8
    assert go(store, "b").verdict is Verdict.DUPLICATE


def test_a_dead_holders_claim_lapses_and_the_task_runs_again(store, clock):
    """Kill -9 of the holder: no refresh, the claim expires, the next delivery runs attempt 2."""
    go(store, "a")
    clock.t += 10.5
    adm = go(store, "b")
    assert (adm.verdict, adm.attempt) == (Verdict.RUN, 2)


def test_past_the_limit_a_task_is_dead_lettered_not_run(store, clock):
    """A task whose worker dies every time: attempts 1..3 run, the 4th delivery dead-letters it."""
    for attempt in (1, 2, 3):
        adm = go(store, f"h{attempt}")
        assert (adm.verdict, adm.attempt) == (Verdict.RUN, attempt)
        clock.t += 11  # the holder died; its claim lapses
    adm = go(store, "h4")
    assert adm.verdict is Verdict.DEAD_LETTER
    assert adm.attempt == 3
    assert adm.last_error is None  # nothing recorded: the worker died each time


def test_dead_letter_carries_the_last_error(store):
    """A handler that raised leaves its error for the dead-letter entry."""
    go(store, limit=1)
    store.record_error("t1", "RuntimeError: boom")
    store.release("t1", "a")
    adm = go(store, "b", limit=1)
    assert adm.verdict is Verdict.DEAD_LETTER
    assert adm.last_error == "RuntimeError: boom"


def test_after_dead_lettering_a_redelivery_fails_without_a_second_entry(store):
    """The dead mark wins over running: the entry is returned, the claim released."""
    go(store)
    assert store.mark_dead("t1", {"task_id": "t1"})
    assert not store.mark_dead("t1", {"task_id": "t1"})
    store.release("t1", "a")
    adm = go(store, "b")
    assert adm.verdict is Verdict.ALREADY_DEAD
    assert store.claim_ttl_s("t1") is None


def test_a_result_recorded_between_checks_is_seen_after_the_claim(store):
    """finish() records then releases: a claim won right after still returns the result."""
    go(store, "a")
    store.finish("t1", "a", {"x": 1})
    assert store.claim_ttl_s("t1") is None
    assert go(store, "b").verdict is Verdict.COMPLETED


def test_reset_forgets_everything(store):
    """A requeue from the dead-letter queue starts again at attempt 1."""
    go(store)
    store.record_error("t1", "e")
    store.mark_dead("t1", {})
    store.reset("t1")
    adm = go(store, "b")
    assert (adm.verdict, adm.attempt) == (Verdict.RUN, 1)
    assert store.last_error("t1") is None


def test_every_delivery_is_counted_but_only_claimed_ones_are_attempts(store, clock):
    """Duplicates, completed and dead-lettered redeliveries count as deliveries, not attempts."""
    go(store, "a")
    go(store, "b")  # duplicate
    store.finish("t1", "a", {})
    go(store, "c")  # completed
    assert store.counts("t1") == (3, 1)


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        (ClaimOutcome("done", result={"r": 1}), Admission(Verdict.COMPLETED, result={"r": 1})),
        (ClaimOutcome("held", claim_left_s=4.0), Admission(Verdict.DUPLICATE, wait_s=4.0)),
        (ClaimOutcome("held"), Admission(Verdict.DUPLICATE, wait_s=10.0)),
        (ClaimOutcome("dead", entry={"e": 1}), Admission(Verdict.ALREADY_DEAD, entry={"e": 1})),
        (ClaimOutcome("claimed", attempt=1), Admission(Verdict.RUN, attempt=1)),
        (ClaimOutcome("claimed", attempt=3), Admission(Verdict.RUN, attempt=3)),
        (
            ClaimOutcome("claimed", attempt=4, last_error="E: x"),
            Admission(Verdict.DEAD_LETTER, attempt=3, last_error="E: x"),
        ),
        (ClaimOutcome("claimed", attempt=4), Admission(Verdict.DEAD_LETTER, attempt=3)),
    ],
)
def test_decision_table(seen, expected):
    """What the store saw maps to one verdict (TTL 10 s, 3 attempts); no I/O involved."""
    assert decide(seen, ttl_s=10.0, max_attempts=3) == expected


class CountingStore:
    """Wraps the fake store, counting calls per method (one call = one round trip on Redis)."""

    def __init__(self, inner: MemoryExecutionStore) -> None:
        """No calls yet."""
        self.inner = inner
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        """The inner store's method, counted."""
        self.calls[name] = self.calls.get(name, 0) + 1
        return getattr(self.inner, name)


def test_a_successful_task_costs_two_store_steps(clock):
    """Admission is one step, recording the result and releasing the claim one more."""
    store = CountingStore(MemoryExecutionStore(clock))
    refresher = ClaimRefresher(interval_s=3600)
    adm = admit(store, "t1", "a", ttl_s=10.0, max_attempts=3)
    with ClaimKeeper(store, "t1", "a", 10.0, refresher) as keeper:
        assert refresher.held() == [("t1", "a")]
        keeper.finish({"ok": True})
    refresher.stop()
    assert adm.verdict is Verdict.RUN
    assert store.calls == {"try_claim": 1, "finish": 1}
    assert store.inner.claim_ttl_s("t1") is None
    assert refresher.held() == []


def test_leaving_the_block_without_a_result_releases_the_claim(store):
    """An exception (or a retry) leaves the block: the claim is released for the next delivery."""
    refresher = ClaimRefresher(interval_s=3600)
    go(store, "a")
    with pytest.raises(RuntimeError), ClaimKeeper(store, "t1", "a", 10.0, refresher):
        raise RuntimeError
    refresher.stop()
    assert store.claim_ttl_s("t1") is None
    assert go(store, "b").attempt == 2


def test_one_tick_refreshes_every_held_claim(store, clock):
    """A tick extends each registered claim to its full TTL; dropped claims are left to lapse."""
    refresher = ClaimRefresher(interval_s=3600)  # ticks by hand
    for task in ("t1", "t2", "t3"):
        store.try_claim(task, "a", 10.0, 3)
    for task in ("t1", "t2"):
        refresher.hold(store, task, "a", 10.0)
    refresher.drop("t2", "a")
    clock.t += 8
    assert refresher.tick() == 1
    assert store.claim_ttl_s("t1") == 10.0
    assert store.claim_ttl_s("t2") == pytest.approx(2.0)
    clock.t += 3
    assert store.claim_ttl_s("t2") is None  # lapsed: dropped claims are not kept alive
    assert store.claim_ttl_s("t3") is None
    refresher.stop()


def test_a_lost_claim_is_logged_and_a_finished_one_is_not(store, clock):
    """Refreshing a claim another delivery took warns task.claim_lost; one released meanwhile does not."""
    refresher = ClaimRefresher(interval_s=3600)
    go(store, "a")
    refresher.hold(store, "t1", "a", 10.0)
    clock.t += 11  # the process stalled past the TTL
    go(store, "b")
    with capture_logs() as logs:
        assert refresher.tick() == 0
    assert [e["event"] for e in logs] == ["task.claim_lost"]
    refresher.drop("t1", "a")
    store.try_claim("t2", "c", 10.0, 3)
    refresher.hold(store, "t2", "c", 10.0)
    store.finish("t2", "c", {})  # finished between the tick's snapshot and its refresh
    refresher.drop("t2", "c")
    with capture_logs() as logs:
        assert refresher.tick() == 0
    assert logs == []


def test_one_refresher_thread_per_process_keeps_claims_alive():
    """Twenty claims held at once share one lazily started thread, which keeps them held past the TTL."""
    store = MemoryExecutionStore()  # real monotonic clock
    before = {t.ident for t in threading.enumerate()}
    ids = [f"short-{i}" for i in range(20)]
    with contextlib.ExitStack() as stack:
        for task in ids:
            assert store.try_claim(task, "a", 0.9, 3).seen == "claimed"
            stack.enter_context(ClaimKeeper(store, task, "a", 0.9))
        new = [t for t in threading.enumerate() if t.ident not in before]
        assert [t.name for t in new] == ["fleet-claims"]
        assert process_refresher(0.9).held() == [(task, "a") for task in ids]
        time.sleep(2.0)  # over twice the TTL
        assert {store.try_claim(task, "b", 0.9, 3).seen for task in ids} == {"held"}
    assert {store.claim_ttl_s(task) for task in ids} == {None}  # released on the way out
    assert process_refresher(0.9).held() == []


@pytest.mark.parametrize(
    ("base", "attempt", "expected"),
    [(30.0, 1, 30.0), (30.0, 2, 60.0), (30.0, 3, 120.0), (30.0, 10, 900.0), (0.5, 2, 1.0)],
)
def test_backoff_doubles_and_is_capped(base, attempt, expected):
    """Retry waits double per attempt, capped at 15 minutes."""
    assert backoff_s(OncePolicy(backoff_s=base), attempt) == expected


def test_policy_from_env():
    """The knobs come from FLEET_* variables; nonsense is refused."""
    policy = OncePolicy.from_env(
        {"FLEET_CLAIM_TTL_S": "2", "FLEET_MAX_ATTEMPTS": "5", "FLEET_RETRY_BACKOFF_S": "0.1"}
    )
    assert policy == OncePolicy(2.0, 5, 0.1)
    assert OncePolicy.from_env({}) == OncePolicy()
    with pytest.raises(ValueError, match="invalid"):
        OncePolicy.from_env({"FLEET_MAX_ATTEMPTS": "0"})


@pytest.mark.parametrize(
    ("env", "broker", "expected"),
    [
        ({"FLEET_STATE_URL": "redis://s/1"}, "amqp://h//", "redis://s/1"),
        ({}, "redis://b/0", "redis://b/0"),
        ({"FLEET_LOCK_URL": "redis://l/2"}, "amqp://h//", "redis://l/2"),
        ({}, "amqp://h//", None),
    ],
)
def test_state_store_location(env, broker, expected):
    """FLEET_STATE_URL, else a Redis broker, else FLEET_LOCK_URL, else none (guard off)."""
    assert state_url(env, broker) == expected


def test_visibility_timeout_from_env():
    """FLEET_VISIBILITY_TIMEOUT_S sets the Redis visibility timeout (default 300 s)."""
    short = Settings.from_env({"FLEET_VISIBILITY_TIMEOUT_S": "3"})
    options = broker_transport_options(short)
    assert options["visibility_timeout"] == 3
    assert options["unacked_restore_interval"] == 1
    assert options["unacked_restore_throttle"] == 1
    default = broker_transport_options(Settings.from_env({}))
    assert default["visibility_timeout"] == 300
    assert default["unacked_restore_interval"] == 30


def test_unacked_index_key_follows_kombu_options():
    """The sorted set name honours kombu's unacked_index_key and global_keyprefix."""
    assert unacked_index_key({}) == "unacked_index"
    assert unacked_index_key({"global_keyprefix": "p:", "unacked_index_key": "ui"}) == "p:ui"


class FakeRedis:
    """Records ZADD calls."""

    def __init__(self) -> None:
        """No calls yet."""
        self.calls: list[tuple[str, dict[str, float], bool, bool]] = []

    def zadd(self, key, mapping, *, xx=False, ch=False):
        """Record the call; every member counts as changed."""
        self.calls.append((key, dict(mapping), xx, ch))
        return len(mapping)


def test_lease_tick_rescores_held_tags_only_if_present():
    """One tick re-scores every held tag with the clock's time, with ZADD XX (never re-adds)."""
    fake = FakeRedis()
    extender = LeaseExtender(
        fake,  # type: ignore[arg-type]
        "unacked_index",
        1.0,
        tags=lambda: ["tag-a", "tag-b"],
        clock=lambda: 1234.5,
    )
    assert extender.tick() == 2
    assert fake.calls == [("unacked_index", {"tag-a": 1234.5, "tag-b": 1234.5}, True, True)]
    idle = LeaseExtender(fake, "k", 1.0, tags=list, clock=lambda: 0.0)  # type: ignore[arg-type]
    assert idle.tick() == 0
    assert len(fake.calls) == 1
