"""Generation responses: what streaming generation yields per token, and the statistics line.

`responses` turns the engine's ids per step into `GenerationResponse`s (text segments,
stops, speeds, peak memory), for one prompt or a batch; `format_stats` is what the
command lines print at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class GenerationResponse:
    """One generated token and what it adds.

    `text` may be "" (an unfinished UTF-8 character, or text held back because it
    could begin a stop string).  `logprobs` is the step's log-softmax [V] after the
    logits processors.  `prompt_tokens` counts the prompt tokens fed (with a prompt
    cache, those it did not already hold).  Speeds are tokens/s: `prompt_tps` over
    the prefill (up to the first token), `generation_tps` since the first token.  `peak_memory` is in
    GB.  `finish_reason` is None until the last response: "stop" (a stop id or
    string) or "length" (max_tokens or the context length).  With speculative decoding,
    `draft_accepted` / `draft_proposed` count the proposals so far (None without).
    """

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    draft_accepted: int | None = None  # speculative decoding: proposed tokens the target kept so far
    draft_proposed: int | None = None  # speculative decoding: tokens proposed so far




def responses_of(steps, rows, n_prompts, budget, stats=None) -> Iterator[list[GenerationResponse | None]]:
    """`GenerationResponse`s (one list per step, None for rows already finished) of `steps`, the
    (ids, logprobs) per step of `generate_step`; `rows` (`prompts.RowText`) turn ids into text and
    stops; `stats` (a `speculative.SpeculativeStats`, when speculating) fill the draft counts."""
    tic = time.perf_counter()
    prompt_tps, produced = 0.0, 0
    active = [True] * len(rows)
    try:
        for n, (tokens, logprobs) in enumerate(steps, start=1):
            if n == 1:  # the prefill ends when the first token is known
                now = time.perf_counter()
                tic, prompt_tps = now, sum(n_prompts) / max(now - tic, 1e-9)
            produced += sum(active)
            tps, memory = produced / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9
            out: list[GenerationResponse | None] = []
            for b, row in enumerate(rows):
                if not active[b]:
                    out.append(None)
                    continue
                text, finish = row.add(tokens[b])
                if finish is None and n == budget:
                    tail, finish = row.finish()
                    text, finish = text + tail, finish or "length"
                active[b] = finish is None
                drafts = (stats.accepted, stats.proposed) if stats is not None else (None, None)
                out.append(GenerationResponse(text, tokens[b], logprobs[b], n_prompts[b], prompt_tps, n, tps,
                                              memory, finish, *drafts))
            yield out
            if not any(active):
                return
    finally:
        steps.close()  # stop the decode loop (and its queued step) with us




def format_stats(r: GenerationResponse) -> str:
    """The closing statistics the command lines print (and the draft counts, when speculating)."""
    drafts = ""
    if r.draft_proposed is not None:
        drafts = f"Speculation: {r.draft_accepted}/{r.draft_proposed} proposed tokens accepted\n"
    return (f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec\n"
            + drafts + f"Peak memory: {r.peak_memory:.3f} GB")
