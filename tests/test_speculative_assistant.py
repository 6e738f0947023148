"""Speculative decoding with the Gemma 4 assistant drafter as the proposer (assistant_proposer.py).

On the tiny pair make_tiny_gemma4_assistant.py records (E2B-like target, window 6; its drafter): every
round's drafts equal transformers 5.25's `Gemma4AssistantForCausalLM` given what that round reads (the
target's hidden state at p - 1 and its store layers' K/V of 0..p - 1; gemma4_assistant_rounds.npz), also after rounds
that kept proposals and far past the window's wrap; the first round equals transformers' own assisted
`generate`; greedy speculative decoding gives the target's greedy tokens (transformers') and plain
decoding's, with a float and an 8-bit KV cache, through stream_generate and the CLI.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from mlx_gemma.assistant_proposer import AssistantDrafter
from mlx_gemma.engine import prefill, run
from mlx_gemma.errors import ConfigError, GenerationError
from mlx_gemma.generate import main, stream_generate
from mlx_gemma.loading import load
from mlx_gemma.models.batch_rows import with_slack
from mlx_gemma.models.kv_cache import RotatingKVCache
from mlx_gemma.prompt_cache import PromptCache
from mlx_gemma.proposers import Speculation
from mlx_gemma.samplers import log_softmax, make_sampler
from mlx_gemma.speculative import FixedK, SpeculativeStep, one_token_at_a_time

FOLDER = FIXTURES / "tiny_gemma4_assistant"
TARGET = FIXTURES / "tiny_gemma4_e2b"
K = 4  # proposals a round, as gemma4_assistant_rounds.npz records them
RTOL = 1e-4
# Round drafts: our target's hidden states and K/V come from cached decoding (a token or 1 + k at a time,
# 30 steps) and transformers' from one full pass each; the drafter chains 4 steps on top.  Measured: first
# steps within 1e-4, the worst chained step 1.8e-4 of the logits' scale, every token equal.
ROUND_RTOL = 5e-4


@pytest.fixture(scope="module")
def ref():
    return np.load(FIXTURES / "gemma4_assistant_rounds.npz")


@pytest.fixture(scope="module")
def pair():
    (target, tokenizer), (drafter, _) = load(TARGET), load(FOLDER)
    return target, tokenizer, drafter


class _Recording:
    """Stands in for the drafter model and keeps each step's logits and position."""

    def __init__(self, model):
        self.inner, self.steps = model, []

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __call__(self, embedding, hidden, kv, position, *args):
        logits, state = self.inner(embedding, hidden, kv, position, *args)
        self.steps.append((position, logits[0, 0]))
        return logits, state


class _Forced(AssistantDrafter):
    """Drafts as the assistant does (recorded), but proposes the target's own next `force[r]` tokens
    in round r first, so rounds keep proposals and the next round starts from row n of the verify pass."""

    def __init__(self, drafter, truth: list[int], prompt: int, force: list[int]):
        super().__init__(drafter)
        self.truth, self.prompt, self.force, self.round = truth, prompt, force, 0

    def propose(self, history, k):
        drafted, q = super().propose(history, k)
        m = min(self.force[self.round % len(self.force)], k)
        self.round += 1
        done = len(history) - self.prompt
        return mx.concatenate([mx.array(self.truth[done : done + m], mx.int32), drafted[m:]]), q


def _speculate(target, proposer, prompt: list[int], max_tokens: int, cache=None) -> list[int]:
    cache = cache if cache is not None else with_slack(target.make_cache(), K)
    ids = mx.array([prompt], mx.int32)
    hidden = prefill(target, ids, cache)
    policy = SpeculativeStep(target, cache, proposer, prompt, max_tokens, K, controller=FixedK(K))
    return [t[0] for t, _ in one_token_at_a_time(run(policy, hidden, max_tokens), max_tokens)]


def _check_rounds(recorder: _Recording, ref) -> int:
    """Every round's drafts against transformers' at its position; the number of rounds."""
    rounds: dict[int, list] = {}
    for position, logits in recorder.steps:
        rounds.setdefault(position, []).append(np.array(logits))
    prompt = len(ref["prompt"])
    for p, rows in rounds.items():
        theirs = ref["logits"][p - prompt, : len(rows)]
        rows = np.stack(rows)
        assert np.abs(rows - theirs).max() / np.abs(theirs).max() < ROUND_RTOL, p
        assert np.array_equal(rows.argmax(-1), ref["drafts"][p - prompt, : len(rows)]), p
    return len(rounds)


def test_every_round_drafts_as_transformers(pair, ref):
    """Nothing the random drafter proposes is kept, so a round starts at every position 5..33, far past
    the window of 6: each round's 4 drafts (logits and tokens) equal transformers' assistant's."""
    target, _, drafter = pair
    recorder = _Recording(drafter)
    prompt, truth = ref["prompt"].tolist(), ref["target"].tolist()
    tokens = _speculate(target, AssistantDrafter(recorder), prompt, len(truth))
    assert tokens == truth  # transformers' greedy tokens for the target
    assert _check_rounds(recorder, ref) == len(truth) - 2  # the last token comes from a plain step
    first = [np.array(logits) for p, logits in recorder.steps[:K]]
    assert np.array_equal(np.argmax(first, -1), ref["generate_round1_drafts"])  # transformers' assisted generate
    assert np.abs(np.stack(first) - ref["generate_round1_logits"]).max() < RTOL * np.abs(first).max()


def test_rounds_after_kept_proposals_start_from_the_kept_row(pair, ref):
    """Rounds that keep 0..4 proposals (the target's own tokens proposed first): the next round reads the
    target's hidden state at the last kept position, and drafts as transformers does there."""
    target, _, drafter = pair
    recorder = _Recording(drafter)
    prompt, truth = ref["prompt"].tolist(), ref["target"].tolist()
    proposer = _Forced(recorder, truth, len(prompt), force=[2, 0, 4, 1, 3])
    tokens = _speculate(target, proposer, prompt, len(truth))
    assert tokens == truth
    rounds = _check_rounds(recorder, ref)
    assert 6 <= rounds < len(truth) - 10  # rounds skipped the kept positions


@pytest.mark.parametrize("kv, form", [({}, "folder"), (dict(kv_bits=8, quantized_kv_start=0, kv_group_size=32), "model"),
                                      (dict(kv_bits=8, quantized_kv_start=9, kv_group_size=32), "load")])
def test_stream_generate_with_the_assistant_equals_plain_greedy(pair, ref, kv, form):
    """draft_model= the assistant (its folder, the model, or load's pair; adaptive k, rings with slack), 30
    tokens past the window's wrap; float KV gives transformers' tokens, 8-bit KV (from the start, or
    switching at 9) its own plain decoding's."""
    target, tokenizer, drafter = pair
    prompt = ref["prompt"].tolist()
    plain = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=30, **kv)]
    if not kv:
        assert plain == ref["target"].tolist()
    draft = {"folder": str(FOLDER), "model": drafter, "load": (drafter, None)}[form]
    responses = list(stream_generate(target, tokenizer, prompt, max_tokens=30, draft_model=draft,
                                     num_draft_tokens=K, **kv))
    assert [r.token for r in responses] == plain
    assert responses[-1].draft_proposed > 0 and responses[-1].draft_accepted == 0  # random: nothing kept


def test_speculation_picks_the_assistant_proposer(pair):
    target, tokenizer, drafter = pair
    spec = Speculation.of(draft_model=str(FOLDER))
    proposer = spec.proposer(tokenizer, None, target.args.vocab_size)
    assert isinstance(proposer, AssistantDrafter) and proposer.model.model_type == "gemma4_assistant"
    assert proposer.cache == [] and proposer.fed == 0  # nothing of its own for a prompt cache to roll back


def test_sampling_draws_from_the_drafters_distribution(pair, ref):
    """At temperature 1, q (the rejection rule's draft distribution) is the drafter's softmax: its first
    row equals transformers' first draft logits' log-softmax; every draw is a token q allows."""
    target, _, drafter = pair
    prompt = ref["prompt"].tolist()
    sampler = make_sampler(temp=1.0, seed=3)
    proposer = AssistantDrafter(drafter).bind(sampler, target.args.vocab_size)
    cache = target.make_cache()
    hidden = prefill(target, mx.array([prompt], mx.int32), cache)
    proposer.observe(target, cache, hidden[0, -1:])
    tokens, q = proposer.propose(prompt + [int(ref["target"][0])], K)
    assert tokens.shape == (K,) and q.shape == (K, drafter.args.vocab_size)
    theirs = np.array(log_softmax(mx.array(ref["logits"][0, :1])))
    assert np.abs(np.array(q[:1]) - theirs).max() < 1e-4
    assert np.all(np.isfinite(np.array(q)[np.arange(K), np.array(tokens)]))


def test_sampled_speculation_runs_and_counts(pair, ref):
    target, tokenizer, _ = pair
    sampler = make_sampler(temp=0.8, top_k=20, seed=1)
    responses = list(stream_generate(target, tokenizer, ref["prompt"].tolist(), max_tokens=20, sampler=sampler,
                                     draft_model=str(FOLDER), num_draft_tokens=3))
    assert len(responses) == 20 and responses[-1].draft_proposed > 0
    assert all(0 <= r.token < target.args.vocab_size for r in responses)


def test_a_drafter_for_another_target_is_a_typed_error(pair, ref):
    _, _, drafter = pair
    gemma, tok = load(FIXTURES / "tiny_gemma")
    with pytest.raises(GenerationError, match="Gemma 4 target"):
        list(stream_generate(gemma, tok, [2, 5, 6], max_tokens=4, draft_model=drafter))
    other, tok = load(FIXTURES / "tiny_gemma4_31b")  # its sliding layers have 2 KV heads
    with pytest.raises(ConfigError, match="KV heads") as e:
        list(stream_generate(other, tok, [2, 5, 6], max_tokens=4, draft_model=drafter))
    assert str(FOLDER) in str(e.value)
    with pytest.raises(GenerationError, match="gemma4_assistant"):
        AssistantDrafter(gemma)


def test_cli_draft_model_takes_an_assistant_folder(capsys):
    assert main(["--model", str(TARGET), "--prompt", "a b c", "--draft-model", str(FOLDER), "-m", "12",
                 "--no-chat"]) == 0
    assert "proposed tokens accepted" in capsys.readouterr().err


def test_turns_on_a_prompt_cache_equal_plain_greedy(pair, ref):
    """Three turns continuing one PromptCache (the assistant holds no cache to pair with it), then a new
    conversation on the same cache (trimmed to nothing): each equals plain greedy decoding of it."""
    target, tokenizer, drafter = pair
    cache, text = PromptCache(target), ref["prompt"].tolist()
    for turn in range(4):
        text = [2, 9, 8] if turn == 3 else text + [7 + turn, 40 + turn]
        plain = [r.token for r in stream_generate(target, tokenizer, text, max_tokens=8)]
        responses = list(stream_generate(target, tokenizer, text, max_tokens=8, prompt_cache=cache,
                                         draft_model=drafter, num_draft_tokens=3))
        assert [r.token for r in responses] == plain, turn
        assert responses[-1].draft_proposed > 0
        text = text + plain


def test_a_wrapped_ring_trimmed_to_nothing_starts_over():
    """After going back to no tokens, a ring that had wrapped holds nothing old: filled again to its size,
    it goes back within its slack (its floor of dropped positions no longer applies)."""
    ring = RotatingKVCache(4, slack=2)
    step = mx.zeros((1, 1, 1, 8))
    for _ in range(8):
        ring.update_and_fetch(step, step)
    assert ring.trim_to(0)
    for _ in range(6):
        ring.update_and_fetch(step, step)
    assert ring.can_trim_to(3) and ring.trim_to(3) and ring.offset == 3
