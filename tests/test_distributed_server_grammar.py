"""Grammar-constrained replies on the server across ranks (issue 23; mlx_gemma/distributed/processor_messages.py):
rank 0 sends each job's grammar constraint as its grammar text, and the follower builds its own.

In process: a rebuilt constraint masks exactly as rank 0's along a reply; what cannot be described (a
Python callable, a subclass, a constraint already used) is refused; a follower whose tokenizer would
mask otherwise refuses to follow.

Across ranks (`mlx.launch -n 2 --backend ring`, tests/distributed_scripts/server_rank.py; one launch per
strategy, since starting two ranks costs tens of seconds here), driven by the official `openai` client
against the same model served by one process (`python -m mlx_gemma.server`): greedy json_schema (token
for token, with logprobs) and json_object replies, forced tool calls (a named function and "required"),
seeded samples of Gemma 4's optional thought before a forced call, and a seeded sampled json_schema
reply all equal the single-process server's; three more sampled at once (temperature 1, seeded and
unseeded) validate with `jsonschema`; afterwards a greedy chat still equals one process's
`mlx_gemma.generate` (the ranks in step), and SIGTERM ends both ranks with status 0.

The model: tiny_gemma4_e2b's Gemma 4 text model with the Gemma 4 tokenizer (tool-call tokens, thoughts,
its stop pieces) and a 4k context, built here: tiny_gemma4_mm, the fixture with that tokenizer, has one
pipeline stage only (its KV-shared layers read every earlier one), and e2b's own tokenizer has no Gemma 4
pieces.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import openai
import pytest
import mlx.core as mx
from conftest import FIXTURES
from test_distributed_server import reference, serving
from test_server import start_server, stop_server
from test_server_json import MAX_TOKENS, SCHEMA, SCHEMA_FORMAT  # (bounded: a random model's JSON ends)
from test_server_json import MESSAGES as PET

import mlx_gemma
from mlx_gemma.distributed.job_messages import job_payload, refusal, row_from
from mlx_gemma.errors import DistributedError
from mlx_gemma.grammar import GrammarConstraint, compile_response_format
from mlx_gemma.jobs import Job, Row
from mlx_gemma.tokenizer import GemmaTokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "soon": {"type": "boolean"}},
                   "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time.",
                                        "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, NOW]
WEATHER_ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
COUNT = [{"role": "user", "content": "Count to 7, then stop."}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma4") / "tiny_gemma4_tools"
    shutil.copytree(FIXTURES / "tiny_gemma4_e2b", out,
                    ignore=shutil.ignore_patterns("reference.npz", "generation_config.json", "tokenizer.model"))
    shutil.copy(FIXTURES / "gemma4_tokenizer" / "tokenizer.model", out)  # its stop ids come from its pieces
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # room for a random model's JSON (RoPE: no learned positions)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def loaded(folder):
    return mlx_gemma.load(folder)


def requests(tok) -> list[dict]:
    """The requests whose replies must equal one process's: greedy JSON, forced calls, seeded thoughts."""
    thought_bias = {str(tok.piece_to_id("<|channel>")): 3.0, str(tok.piece_to_id("<channel|>")): 6.0}  # (opens one, closes it soon)
    named = {"type": "function", "function": {"name": "get_weather"}}
    return [
        dict(messages=PET, max_tokens=MAX_TOKENS, temperature=0, response_format=SCHEMA_FORMAT, logprobs=True),
        dict(messages=PET, max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "json_object"}),
        dict(messages=WEATHER_ASK, tools=TOOLS, tool_choice=named, max_tokens=64, temperature=0),
        dict(messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", max_tokens=64, temperature=0),
        *(dict(messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", max_tokens=160, temperature=1.0, seed=seed,
               logit_bias=thought_bias, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
          for seed in (1, 2)),
        dict(messages=PET, max_tokens=MAX_TOKENS, temperature=1.0, seed=4, response_format=SCHEMA_FORMAT),
    ]


def answer(client, model: str, ask: dict) -> dict:
    """A chat reply's parts: content, thought, calls, finish reason, token count (and tokens when logprobs)."""
    r = client.chat.completions.create(model=model, **ask)
    choice = r.choices[0]
    message = choice.message
    return {"content": message.content or "", "reasoning": (message.model_extra or {}).get("reasoning_content") or "",
            "calls": [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls or []],
            "finish": choice.finish_reason, "tokens": r.usage.completion_tokens,
            "pieces": [t.token for t in choice.logprobs.content] if choice.logprobs else None}


@pytest.fixture(scope="module")
def one_process(folder, loaded) -> list[dict]:
    """The replies of the single-process server to `requests`."""
    proc, url = start_server("--model", str(folder), timeout=300)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        return [answer(client, str(folder), ask) for ask in requests(loaded[1])]
    finally:
        stop_server(proc)


# ----- in process ------------------------------------------------------------------------------------


def test_a_follower_rebuilds_the_constraint_that_masks_as_rank_0s(loaded):
    """rank 0's constraint and the one a follower builds from the job's payload allow the same ids
    at every step of a reply drawn inside the grammar."""
    model, tok = loaded
    ids = tok.apply_chat_template(PET, add_generation_prompt=True, tokenize=True)
    sent = Job(ids, 8, processors=(GrammarConstraint(tok, compile_response_format(SCHEMA_FORMAT, tok)),))
    assert refusal(sent) is None
    got = row_from(model, job_payload(Row(7, sent, print, 8)), tok)
    assert got.id == 7 and got.job.prompt_ids == ids
    (mine,), (theirs,) = sent.processors, got.job.processors
    assert theirs is not mine and theirs.grammar == mine.grammar
    rng = np.random.default_rng(0)
    history = list(ids)
    logits = mx.zeros((1, model.args.vocab_size))
    for _ in range(40):
        masks = [np.isfinite(np.array(c(mx.array([history]), logits))) for c in (mine, theirs)]
        np.testing.assert_array_equal(masks[0], masks[1])
        allowed = np.flatnonzero(masks[0][0])
        history.append(int(rng.choice(allowed)))
        if mine.complete():
            break
    assert mine.complete() == theirs.complete()


def test_what_cannot_be_described_is_refused(loaded):
    _, tok = loaded
    grammar = compile_response_format({"type": "json_object"}, tok)

    class Mine(GrammarConstraint):
        pass

    used = GrammarConstraint(tok, grammar)
    used(mx.array([[2, 3]]), mx.zeros((1, tok.vocab_size)))
    for processor, what in [(lambda h, x: x, "a logits processor other than the server's grammar constraints"),
                            (Mine(tok, grammar), "Mine"), (used, "already been used")]:
        why = refusal(Job([2, 3], 4, processors=(processor,)))
        assert why is not None and what in why and why.endswith("is not served across ranks (--pipeline / --tensor-parallel)")


def test_a_follower_whose_tokenizer_masks_otherwise_refuses(loaded):
    model, tok = loaded
    job = Job([2, 3], 4, processors=(GrammarConstraint(tok, compile_response_format({"type": "json_object"}, tok)),))
    payload = job_payload(Row(1, job, print, 4))
    with pytest.raises(DistributedError, match="no tokenizer"):
        row_from(model, payload, None)
    other = GemmaTokenizer.from_folder(FIXTURES / "tiny_gemma3")  # eos {1} over 400 ids, not {1, 6, 14} over 420
    with pytest.raises(DistributedError, match=r"eos ids \[1, 6, 14\] over 420 ids.*\[1\] over 400"):
        row_from(model, payload, other)


# ----- across ranks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--pipeline", "--tensor-parallel"])
def test_two_ranks_serve_grammars_as_one_process(tmp_path, flag, folder, loaded, one_process):
    model_name = str(folder)
    with serving(tmp_path, flag, model_name) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        got = [answer(client, model_name, ask) for ask in requests(loaded[1])]
        for want, mine, ask in zip(one_process, got, requests(loaded[1])):
            assert mine == want, ask
        json_schema, json_object, named, required, *thoughts, seeded = one_process
        assert json_schema["pieces"] and json_schema["finish"] == "stop"
        jsonschema.validate(json.loads(json_schema["content"]), SCHEMA)
        assert isinstance(json.loads(json_object["content"]), dict)
        assert [name for name, _ in named["calls"]] == ["get_weather"] and required["calls"]
        assert all(t["calls"] and t["finish"] == "tool_calls" for t in thoughts)
        assert any(t["reasoning"] for t in thoughts)  # a thought came before a forced call
        jsonschema.validate(json.loads(seeded["content"]), SCHEMA)
        # sampled at once, seeded and not: each a whole reply valid against the schema
        sampled = [dict(messages=PET, max_tokens=MAX_TOKENS, temperature=1.0, response_format=SCHEMA_FORMAT, **seed)
                   for seed in ({"seed": 11}, {}, {})]
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda ask: answer(client, model_name, ask), sampled))
        for reply in replies:
            assert reply["finish"] == "stop", reply
            jsonschema.validate(json.loads(reply["content"]), SCHEMA)
        # the ranks are still in step: a greedy chat equals one process's generate
        r = client.chat.completions.create(model=model_name, messages=COUNT, max_tokens=12, temperature=0)
        assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == \
            reference(loaded, COUNT, 12)
