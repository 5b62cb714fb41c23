"""An in-memory provider that keeps the contract of ``fleet.providers.base``, for tests.

Part of the product (like dramatiq's ``StubBroker``): test your own code against it.
It records every call, lets a test inject failures, and models the cloud's eventual
consistency and passive transitions without sleeping or I/O:

* ``launch_calls`` / ``terminate_calls`` record every call as made, failed ones too,
  so a test can assert that a caller did not multiply launches after an error.
* ``next_launch_errors`` (a list of ``ProviderError`` or ``ErrorKind``): each launch
  pops the first and fails with it; an ``ErrorKind`` becomes a ``ProviderError`` for
  the request's pool and offer at ``now``. Popped before the token is looked up, so
  a retry with a known token can fail too, as a timed-out cloud call can.
* ``fail_offers`` (``OfferRef.key`` -> ``ErrorKind``): launches of those offers always
  fail with that kind (an offer with no capacity). A token that already has an
  instance still returns it.
* ``throttle_next``: the next N calls of any kind (launch, terminate, list) fail with
  ``ErrorKind.THROTTLED`` and change nothing.
* Idempotent by token, forever: a launch with a token that already launched returns
  that instance as last known (even after it was terminated, as EC2's client tokens
  do) and creates nothing.
* Lifecycle: an instance starts PENDING and is reported RUNNING by the first list call
  that shows it (or starts RUNNING with ``start_running=True``; or stays PENDING until
  ``mark_running`` with ``promote_on_list=False``).
* ``list_lag=N``: a launched instance is left out of the next N list calls, and a
  terminated one is still listed (as TERMINATING) by the next N list calls.
* ``add_foreign`` plants an instance that carries our tag but belongs to a pool the
  config does not know (an orphan), listed at once.

Times are the ``now`` arguments callers pass (an injected clock); nothing here reads
the wall clock. All methods are safe to call from several threads.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from dataclasses import dataclass

from fleet.autoscaler.model import ErrorKind, Instance, InstanceState, OfferRef, ProviderError
from fleet.providers.base import (
    ACCELERATOR_TAG,
    FLEET_TAG,
    POOL_TAG,
    TOKEN_TAG,
    LaunchRequest,
    LaunchResult,
)


@dataclass(slots=True)
class _Record:
    """One instance the fake knows: what it reports, its tags, and when it is listed."""

    instance: Instance
    tags: dict[str, str]
    visible_after: int  # listed by list calls numbered above this
    gone_at: int | None = None  # list-call count when it was terminated


class FakeProvider:
    """In-memory ``Provider`` with recorded calls and injectable failures (see the module)."""

    name = "fake"

    def __init__(
        self,
        *,
        list_lag: int = 0,
        start_running: bool = False,
        promote_on_list: bool = True,
    ) -> None:
        """Build an empty fake.

        Args:
            list_lag: list calls that leave out a new instance (and still show a
                terminated one); 0 is a consistent cloud.
            start_running: launched instances are RUNNING at once instead of PENDING.
            promote_on_list: a list call reports PENDING instances RUNNING (the passive
                transition); False keeps them PENDING until ``mark_running``.

        """
        if list_lag < 0:
            raise ValueError("list_lag must be >= 0")
        self.list_lag = list_lag
        self.start_running = start_running
        self.promote_on_list = promote_on_list
        self.launch_calls: list[LaunchRequest] = []
        self.terminate_calls: list[str] = []
        self.list_calls = 0
        self.next_launch_errors: list[ProviderError | ErrorKind] = []
        self.fail_offers: dict[str, ErrorKind] = {}
        self.throttle_next = 0
        self._records: dict[str, _Record] = {}  # every instance ever made, gone ones too
        self._by_token: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    # -- the Provider contract -------------------------------------------------------

    def launch(self, request: LaunchRequest, now: float) -> LaunchResult:
        """Start one instance of ``request.offer``, idempotently by ``request.token``.

        Returns:
            The new instance (PENDING, or RUNNING with ``start_running``), the one this
            token already made, or an error (throttled, injected, or ``fail_offers``).

        """
        with self._lock:
            self.launch_calls.append(request)
            if self._throttled():
                return LaunchResult(
                    error=self._error(request.pool, request.offer, ErrorKind.THROTTLED, now)
                )
            if self.next_launch_errors:
                return LaunchResult(
                    error=self._injected(self.next_launch_errors.pop(0), request, now)
                )
            known = self._by_token.get(request.token)
            if known is not None:
                return LaunchResult(instance=self._records[known].instance)
            kind = self.fail_offers.get(request.offer.key)
            if kind is not None:
                return LaunchResult(error=self._error(request.pool, request.offer, kind, now))
            instance_id = f"fake-{next(self._ids):06d}"
            instance = Instance(
                id=instance_id,
                pool=request.pool,
                offer=request.offer,
                state=InstanceState.RUNNING if self.start_running else InstanceState.PENDING,
                launched_at=now,
                token=request.token,
                usd_per_hour=request.usd_per_hour,
                devices=request.devices,
                workers=(f"{request.accelerator}-{instance_id}@fake",),
            )
            self._records[instance.id] = _Record(
                instance, request.tags(), visible_after=self.list_calls + self.list_lag
            )
            self._by_token[request.token] = instance.id
            return LaunchResult(instance=instance)

    def terminate(self, instance_id: str, now: float) -> ProviderError | None:
        """Stop an instance; None on success or when it is unknown or already gone."""
        with self._lock:
            self.terminate_calls.append(instance_id)
            record = self._records.get(instance_id)
            if self._throttled():
                pool = record.instance.pool if record else ""
                offer = record.instance.offer if record else None
                return self._error(pool, offer, ErrorKind.THROTTLED, now)
            if record is not None and record.gone_at is None:
                record.gone_at = self.list_calls
            return None

    def list_instances(self, now: float) -> list[Instance] | ProviderError:
        """Every instance carrying our fleet tag, as this (possibly lagging) call sees it."""
        with self._lock:
            if self._throttled():
                return self._error("", None, ErrorKind.THROTTLED, now)
            self.list_calls += 1
            call = self.list_calls
            out: list[Instance] = []
            for record in self._records.values():
                if record.gone_at is not None:
                    if call <= record.gone_at + self.list_lag:
                        out.append(
                            dataclasses.replace(record.instance, state=InstanceState.TERMINATING)
                        )
                    continue
                if call <= record.visible_after:
                    continue
                if self.promote_on_list and record.instance.state is InstanceState.PENDING:
                    record.instance = dataclasses.replace(
                        record.instance, state=InstanceState.RUNNING
                    )
                out.append(record.instance)
            return out

    # -- helpers for tests -----------------------------------------------------------

    @property
    def instances(self) -> dict[str, Instance]:
        """Live instances by id as the fake knows them now (no lag), for assertions."""
        with self._lock:
            return {i: r.instance for i, r in self._records.items() if r.gone_at is None}

    def tags(self, instance_id: str) -> dict[str, str]:
        """The tags instance ``instance_id`` was launched with (gone ones too).

        Raises:
            KeyError: the fake never made nor was given this instance.

        """
        with self._lock:
            return dict(self._records[instance_id].tags)

    def mark_running(self, instance_id: str) -> None:
        """Report a live instance RUNNING from now on (``set_state`` with RUNNING)."""
        self.set_state(instance_id, InstanceState.RUNNING)

    def set_state(self, instance_id: str, state: InstanceState) -> None:
        """Make a live instance report ``state`` from now on.

        Raises:
            KeyError: no live instance has this id.

        """
        with self._lock:
            record = self._records[instance_id]
            if record.gone_at is not None:
                raise KeyError(instance_id)
            record.instance = dataclasses.replace(record.instance, state=state)

    def add_foreign(
        self, instance: Instance, *, accelerator: str = "", fleet_name: str = "fleet"
    ) -> None:
        """Plant ``instance`` carrying our fleet tag (its pool need not be configured).

        It is listed by the next list call, whatever ``list_lag``; its token becomes
        known, so a launch with that token returns it.
        """
        with self._lock:
            tags = {
                FLEET_TAG: fleet_name,
                POOL_TAG: instance.pool,
                ACCELERATOR_TAG: accelerator,
                TOKEN_TAG: instance.token,
            }
            self._records[instance.id] = _Record(instance, tags, visible_after=self.list_calls)
            self._by_token[instance.token] = instance.id

    # -- internals -------------------------------------------------------------------

    def _throttled(self) -> bool:
        if self.throttle_next > 0:
            self.throttle_next -= 1
            return True
        return False

    @staticmethod
    def _error(pool: str, offer: OfferRef | None, kind: ErrorKind, now: float) -> ProviderError:
        where = f" for {offer.key}" if offer else ""
        return ProviderError(
            pool=pool, offer=offer, kind=kind, message=f"fake {kind.value} error{where}", at=now
        )

    def _injected(
        self, injected: ProviderError | ErrorKind, request: LaunchRequest, now: float
    ) -> ProviderError:
        if isinstance(injected, ProviderError):
            return injected
        return self._error(request.pool, request.offer, injected, now)
