"""Adaptive speculation (mlx_gemma.speculative_control): its decisions under simulated step costs.

No timer is read: a simulated decoder charges each step a fixed cost (a plain step 1.0; a step
proposing k, 1 + b k; a draft's catch-up, `catch_up` per token it missed) and keeps proposals by a
seeded coin of probability a, so every decision the controller makes is deterministic.  The
speed-ups asserted are what the simulation's own costs give against plain decoding's.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlx_gemma.speculative_control import Adaptive, expected_tokens, gain


class Simulated:
    """A decoder of `prompt` + generated tokens with made-up costs; `acceptance(t)` at token t."""

    def __init__(self, control, b, acceptance, catch_up=0.0, prompt=0, seed=0):
        self.control, self.b, self.acceptance, self.catch_up = control, b, acceptance, catch_up
        self.rng = np.random.default_rng(seed)
        self.missed = prompt  # tokens the proposer has not read (a draft model's catch-up)
        self.tokens, self.seconds, self.proposed_steps = 0, 0.0, []

    def run(self, n: int) -> float:
        """Decode n tokens; their speed over plain decoding's (1 token per second)."""
        while self.tokens < n:
            k = self.control.plan()
            if k == 0:
                seconds, emitted = 1.0, 1
                self.missed += 1
            else:
                kept = 0
                while kept < k and self.rng.random() < self.acceptance(self.tokens):
                    kept += 1
                seconds, emitted = 1.0 + self.b * k + self.catch_up * self.missed, kept + 1
                self.missed = 0
            self.proposed_steps.append(k)
            self.control.record(k, emitted, seconds)
            self.tokens += emitted
            self.seconds += seconds
        return self.tokens / self.seconds


def test_the_models_expectations():
    assert expected_tokens(1.0, 3) == 4
    assert expected_tokens(0.0, 3) == 1
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)  # 1 + 1/2 + 1/4
    assert gain(0.5, 0.25, 2) == pytest.approx(1.75 / 1.5)


def test_a_draft_as_costly_as_the_target_is_never_run_past_its_own_timing():
    """A self-draft on a CPU where the draft's step costs as much as the target's (b >= 1): its own
    step time rules it out before it reads the prompt, and it is asked again ever more rarely."""
    timed = []

    def draft_seconds():
        timed.append(1)
        return 1.0  # one draft step: as long as a plain target step

    control = Adaptive(3, proposer_seconds=draft_seconds)
    sim = Simulated(control, b=1.1, acceptance=lambda t: 0.95, catch_up=0.2, prompt=200)
    speed = sim.run(1000)
    assert not any(sim.proposed_steps)  # not one speculative step: the prompt's catch-up never happened
    assert speed == 1.0
    assert len(timed) == 1  # timed once, after the 2 plain steps; later probes reuse the ratio


def test_a_costly_proposer_without_its_own_timing_turns_off_fast_and_holds_the_floor():
    """Measured in bursts instead (no step_seconds): off after its second step, probes ever rarer;
    the loss, the first burst's catch-up of a 200-token prompt included, stays under 5% over 1000 tokens."""
    control = Adaptive(3)
    sim = Simulated(control, b=1.1, acceptance=lambda t: 0.9, catch_up=0.02, prompt=200)
    speed = sim.run(1000)
    first_off = next(i for i, k in enumerate(sim.proposed_steps) if i > 2 and k == 0)
    assert first_off <= 2 + control.settle  # two plain, two speculative, then off
    assert speed >= 0.95
    bursts = sum(1 for a, b in zip(sim.proposed_steps, sim.proposed_steps[1:]) if a == 0 and b > 0)
    assert bursts <= 4  # waits of 32, 128, 512 (four times as long each: not even a = 1 pays at b = 1.1)


def test_prompt_lookup_that_quotes_stays_on_at_the_longest_k():
    control = Adaptive(6)
    sim = Simulated(control, b=0.08, acceptance=lambda t: 0.9)
    speed = sim.run(500)
    spec = [k for k in sim.proposed_steps if k]
    assert spec.count(6) / len(spec) > 0.8  # a dips after a run of rejections, and k with it
    plain = sim.proposed_steps.count(0)
    assert plain <= 2 + len(sim.proposed_steps) // 32 + 1  # the first two and one refresh every 32 steps
    assert speed > 0.9 * gain(0.9, 0.08, 6)  # nearly the model's best, refreshes and a's noise included


def test_free_text_turns_lookup_off_and_probes_with_growing_waits():
    control = Adaptive(3, probe_every=32)
    sim = Simulated(control, b=0.3, acceptance=lambda t: 0.02)  # gain(k = 1) = 1.02 / 1.3
    speed = sim.run(2000)
    starts = [i for i, (a, b) in enumerate(zip(sim.proposed_steps, sim.proposed_steps[1:])) if a == 0 and b > 0]
    gaps = np.diff(starts)
    assert len(starts) >= 4
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:]))  # each wait longer than the last
    assert speed >= 0.98


def test_speculation_comes_back_where_the_text_starts_to_quote():
    """Free text for 300 tokens, then a quote: a probe finds it and speculation stays on."""
    control = Adaptive(4)
    sim = Simulated(control, b=0.1, acceptance=lambda t: 0.05 if t < 300 else 0.95)
    sim.run(300)
    before = len(sim.proposed_steps)
    sim.run(1500)
    later = sim.proposed_steps[before:]
    assert later[-200:].count(0) <= 200 // 32 + 1  # on, but for the refresh steps
    assert control.speculating and control.plan() in (0, 4)


def test_the_first_step_of_a_burst_is_not_held_against_it():
    """A draft whose first step reads a long prompt (30 plain steps' worth) but pays afterwards stays on."""
    control = Adaptive(3)
    sim = Simulated(control, b=0.15, acceptance=lambda t: 0.9, catch_up=0.15, prompt=200)
    sim.run(300)
    spec = [k for k in sim.proposed_steps[2:] if k]
    assert len(spec) > 0.9 * len(sim.proposed_steps[2:])


@pytest.mark.parametrize("a, b", [(0.6, 0.3), (0.9, 0.3), (0.95, 0.02), (0.3, 0.05)])
def test_k_is_the_models_best(a, b):
    control = Adaptive(8)
    control.kept, control.rejected = a * 1000, (1 - a) * 1000
    control.costs.extend([b])
    best = max(range(1, 9), key=lambda k: gain(a, b, k))
    assert control.best()[0] == best


class Scripted:
    """A controller that plans k from a fixed script (then 0), recording nothing."""

    def __init__(self, script):
        self.script, self.n = list(script), 0

    def plan(self) -> int:
        return self.script[self.n] if self.n < len(self.script) else 0

    def record(self, proposed: int, emitted: int, seconds: float) -> None:
        self.n += 1


def test_plain_runs_are_pipelined_and_switching_keeps_plain_greedy():
    """Plain steps after plain ones are queued ahead of the host's read (as plain decoding's); a script
    switching speculation on and off mid-text still gives plain greedy decoding's tokens."""
    import mlx.core as mx

    from mlx_gemma.engine import prefill, run
    from mlx_gemma.generate import generate_step
    from mlx_gemma.loading import load
    from mlx_gemma.models.batch_rows import with_slack
    from mlx_gemma.proposers import DraftModel, PromptLookup
    from mlx_gemma.speculative import SpeculativeStep, one_token_at_a_time

    from conftest import FIXTURES

    model, tokenizer = load(FIXTURES / "tiny_gemma3")
    prompt = [17, 17, 5, 17, 17]
    plain = [t[0] for t, _ in generate_step(model, mx.array(prompt), max_tokens=30)]
    for proposer in (PromptLookup(2), DraftModel(model, tokenizer, tokenizer)):
        control = Scripted([0, 0, 0, 3, 3, 0, 0, 2, 0, 0, 0, 3, 1])
        cache = with_slack(model.make_cache(), 3)  # windows of 5-6: room to go back after the wrap
        policy = SpeculativeStep(model, cache, proposer, prompt, 30, 3, controller=control)
        seen = []
        steps = run(policy, prefill(model, mx.array([prompt]), cache), 30)
        tokens = []
        for t, _ in one_token_at_a_time(steps, 30):
            tokens.append(t[0])
            seen.append(policy.pipelined)
        assert tokens == plain
        assert any(seen) and not all(seen) and policy.stats.plain_steps > 0
        if isinstance(proposer, DraftModel):  # it always proposes (lookup finds no match in random text)
            assert policy.stats.verify_steps >= 2
