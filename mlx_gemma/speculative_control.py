"""When speculative decoding pays: the draft length k and on / off, from measured step times and acceptance.

`SpeculativeStep` (speculative.py) asks its controller `plan()` -> k (0: a plain one-token step)
before each step and tells it `record(proposed, emitted, seconds)` after.  `Adaptive` keeps a
cost model fitted to those measurements:

- a step proposing k tokens costs about (1 + b k) plain steps; b (measured, a median of recent
  steps) holds the proposer's work per token -- a draft model's forward pass, next to nothing for
  prompt lookup -- and the target's extra positions in its one pass;
- each proposal is kept with probability a (measured: kept / (kept + rejections), the geometric
  estimate, over recent steps), so a step emits (1 - a^(k+1)) / (1 - a) tokens in expectation
  (Leviathan et al. 2023, eq. 1), and speculating with k speeds decoding up by

      gain(k) = (1 - a^(k+1)) / ((1 - a) (1 + b k)).

It speculates with the k of the largest gain while that gain is at least 1.  Otherwise it runs
plain steps, where nothing else happens (the step does not call the proposer, so a draft model
does no work), and probes again after `probe_every` plain steps, doubling the wait after every
probe that does not pay (four times, where not even every proposal kept would pay; up to
`max_wait`), so that speculation left on where it cannot help costs a vanishing share of the time.
The first speculative step of each burst is not timed into b: a draft model then feeds the tokens it
missed -- the whole prompt, at first, which can cost as much as many plain steps.  So before a burst
a proposer that can time one of its own steps (`DraftModel.step_seconds`) is asked to: when that
alone makes speculating slower than plain decoding even with 4 in 5 proposals kept, the burst is
skipped as a failed probe would be, and the draft never reads the prompt (timed once per generation).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable

HOPEFUL = 0.8  # the acceptance a proposer is given the benefit of before its first burst


def expected_tokens(a: float, k: int) -> float:
    """Tokens a step proposing k emits on average when each proposal is kept with probability a."""
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def gain(a: float, b: float, k: int) -> float:
    """How many times faster than plain decoding speculating with k is, at acceptance a and cost b per proposal."""
    return expected_tokens(a, k) / (1 + b * k)


class Adaptive:
    """Draft length and on / off from a cost model; `plan()` before a step, `record(...)` after it.

    The first `plain_probe` steps are plain, to time plain decoding; speculation then starts at
    k_max.  A burst of speculation is judged after `settle` steps (its first one untimed).  While
    speculating, one plain step in `refresh_every` keeps the plain timing current.
    """

    def __init__(self, k_max: int, probe_every: int = 32, plain_probe: int = 2, settle: int = 2,
                 max_wait: int = 1024, refresh_every: int = 32, window: int = 5, decay: float = 0.7,
                 proposer_seconds: Callable[[], float] | None = None):
        self.k_max, self.k = k_max, k_max
        self.probe_every, self.max_wait, self.settle = probe_every, max_wait, settle
        self.refresh_every, self.decay = refresh_every, decay
        self.plain_left = plain_probe  # plain steps still to run before speculating
        self.off_left = 0  # plain steps still to run with speculation off
        self.wait = probe_every  # the next off period
        self.plain_times: deque[float] = deque(maxlen=window)  # seconds per plain step
        self.costs: deque[float] = deque(maxlen=window)  # b per timed speculative step
        self.kept, self.rejected = 1.0, 1.0  # decayed counts behind a (a prior of 1/2)
        self.burst = 0  # speculative steps since speculation last came on
        self.since_plain = 0  # speculative steps since the last plain one
        self.proposer_seconds = proposer_seconds  # seconds of one proposing step alone, where known
        self.vetted = False  # the proposer's own step time has cleared this burst
        self.floor: float | None = None  # the proposer's step over a plain step's: b is at least this

    # ----- what the model says

    @property
    def acceptance(self) -> float:
        return self.kept / (self.kept + self.rejected)

    @property
    def cost(self) -> float | None:
        """b: a step proposing k costs (1 + b k) plain steps; None before it is measured."""
        return statistics.median(self.costs) if self.costs else None

    def best(self) -> tuple[int, float]:
        """(k, gain) of the best draft length under the current estimates (b unknown: 0)."""
        a, b = self.acceptance, self.cost or 0.0
        return max(((k, gain(a, b, k)) for k in range(1, self.k_max + 1)), key=lambda kg: kg[1])

    # ----- the controller

    def plan(self) -> int:
        """Tokens to propose next step; 0 for a plain step."""
        if not self.speculating or self.since_plain >= self.refresh_every:
            return 0
        if self.burst == 0 and not self._worth_a_burst():
            return 0
        return self.k

    def _worth_a_burst(self) -> bool:
        """Whether a burst could pay, judged by the proposer's own step time before it catches up."""
        if self.vetted or self.proposer_seconds is None or not self.plain_times:
            return True
        if self.floor is None:  # timed once: a ratio of two step times holds while the machine's load changes
            self.floor = self.proposer_seconds() / statistics.median(self.plain_times)
        if max(gain(HOPEFUL, self.floor, k) for k in range(1, self.k_max + 1)) >= 1:
            self.vetted = True
            return True
        self._switch_off(hopeless=True)
        return False

    def _switch_off(self, hopeless: bool) -> None:
        self.off_left, self.burst, self.vetted = self.wait, 0, False
        # Where not even every proposal kept would pay (the proposer costs too much), only b could
        # change on a later probe: wait four times longer, not twice.
        self.wait = min((4 if hopeless else 2) * self.wait, self.max_wait)

    @property
    def speculating(self) -> bool:
        return self.plain_left == 0 and self.off_left == 0

    def record(self, proposed: int, emitted: int, seconds: float) -> None:
        """A step that proposed `proposed` tokens and emitted `emitted` took `seconds`."""
        if proposed == 0:
            self._record_plain(seconds / max(emitted, 1))
            return
        kept = emitted - 1
        self.kept = self.decay * self.kept + kept
        self.rejected = self.decay * self.rejected + (kept < proposed)
        self.burst += 1
        self.since_plain += 1
        if self.burst > 1 and self.plain_times:  # the first step of a burst may hold a draft's catch-up
            plain = statistics.median(self.plain_times)
            self.costs.append(max(0.0, (seconds / plain - 1) / proposed))
        if self.burst < self.settle or self.cost is None:
            return
        self.k, best = self.best()
        if best < 1:
            self._switch_off(max(gain(1.0, self.cost, k) for k in range(1, self.k_max + 1)) < 1)
        elif self.burst == self.settle:
            self.wait = self.probe_every  # it pays: a later fall-off is probed as soon as the first

    def _record_plain(self, seconds: float) -> None:
        self.plain_times.append(seconds)
        self.since_plain = 0
        if self.plain_left > 0:
            self.plain_left -= 1
        elif self.off_left > 0:
            self.off_left -= 1
            if self.off_left == 0:  # probing: recent text weighs more than what came before the pause
                self.kept, self.rejected = self.decay * self.kept, self.decay * self.rejected
                self.k, self.burst = self.k_max, 0


class FixedK:
    """A controller that always proposes k tokens (tests; measuring acceptance alone)."""

    def __init__(self, k: int):
        self.k = k

    def plan(self) -> int:
        return self.k

    def record(self, proposed: int, emitted: int, seconds: float) -> None:
        """Nothing adapts."""
