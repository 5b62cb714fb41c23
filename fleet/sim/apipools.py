"""Token-priced API pools in the simulator: servers with per-token cost and a rate limit.

An API pool has no instance: nothing boots, nothing idles, nothing is billed by the hour.
Each call costs ``ApiOffer.cost_usd(tokens_in, tokens_out)`` and, once started, takes
``ApiOffer.latency_s`` (time to first token plus output at stream speed); calls run in
parallel. What queues them is the rate limit, enforced exactly over sliding 60-second
windows: a call starts at the earliest time ``t`` (calls start in arrival order) when
fewer than ``requests_per_min`` calls started in ``(t - 60, t]`` and their tokens plus its
own are at most ``tokens_per_min``. So any 60 seconds hold at most ``requests_per_min``
starts and ``tokens_per_min`` tokens. A call larger than ``tokens_per_min`` can never
start (placement never sends one: see ``fleet.apiplacement``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fleet.catalog.apis import ApiOffer

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One scheduled call: when it starts and ends, what it cost."""

    start: float
    end: float
    tokens: int
    cost_usd: float


@dataclass
class SimApiPool:
    """One provider's pool: a FIFO rate limiter shared by its offers (one account)."""

    provider: str
    requests_per_min: int
    tokens_per_min: int
    window: deque[tuple[float, int]] = field(default_factory=deque)  # (start, tokens)
    last_start: float = 0.0
    calls: list[ApiCall] = field(default_factory=list)

    @classmethod
    def for_offers(cls, provider: str, offers: list[ApiOffer]) -> SimApiPool:
        """The pool of ``provider``, at the tightest limits among its offers."""
        return cls(
            provider,
            min(o.requests_per_min for o in offers),
            min(o.tokens_per_min for o in offers),
        )

    def earliest_start(self, now: float, tokens: int) -> float:
        """When a call of ``tokens`` arriving at ``now`` may start (after the last one).

        Raises:
            ValueError: the call alone exceeds ``tokens_per_min``.

        """
        if tokens > self.tokens_per_min:
            raise ValueError(
                f"{tokens} tokens in one call exceed {self.provider}'s {self.tokens_per_min} tokens/min"
            )
        t = max(now, self.last_start)
        entries = list(self.window)
        while True:
            live = [(s, n) for s, n in entries if s > t - WINDOW_S]
            used = sum(n for _, n in live)
            if len(live) < self.requests_per_min and used + tokens <= self.tokens_per_min:
                return t
            # Wait until enough of the oldest calls leave the window.
            t = live[0][0] + WINDOW_S
            entries = live[1:]

    def submit(self, offer: ApiOffer, now: float, tokens_in: int, tokens_out: int) -> ApiCall:
        """Schedule one call on ``offer`` arriving at ``now``; returns its timing and cost."""
        tokens = tokens_in + tokens_out
        start = self.earliest_start(now, tokens)
        while self.window and self.window[0][0] <= start - WINDOW_S:
            self.window.popleft()
        self.window.append((start, tokens))
        self.last_start = start
        call = ApiCall(
            start,
            start + offer.latency_s(tokens_in, tokens_out),
            tokens,
            offer.cost_usd(tokens_in, tokens_out),
        )
        self.calls.append(call)
        return call

    def waiting(self, now: float) -> int:
        """Calls scheduled but not yet started at ``now`` (the queue placement sees)."""
        n = 0
        for c in reversed(self.calls):  # calls are in start order
            if c.start <= now:
                break
            n += 1
        return n

    @property
    def cost_usd(self) -> float:
        """What every call so far cost."""
        return sum(c.cost_usd for c in self.calls)
