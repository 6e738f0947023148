"""A job's own logits processors as rank 0 sends them to the followers when serving across ranks
(issue 23; job_messages.py puts them in a job's payload).

A grammar-constrained reply (response_format json_object / json_schema, forced tool calls, Gemma 4's
thought before a forced call) is a `grammar.GrammarConstraint` among the job's processors, on rank 0
only.  The followers sample from the same shared logits, so each must mask them as rank 0 does: rank 0
sends each constraint as its grammar text (llguidance's, already compiled from the schema or the Lark
of the tool formats, so no follower compiles a request) and each follower builds its own constraint
from it with its own tokenizer (every rank loads the same folder).  A constraint is a pure function
of its grammar, the tokenizer's ids and the history it is fed, which is the same on every rank, so
its masks are too.  Sent with it: the eos ids and vocabulary size the mask used on rank 0, which a
follower checks against its own (a mismatch would draw other tokens: a DistributedError).

Not describable, so refused at submit (`refusal`): any other processor (a Python callable a library
user passed), a subclass of the constraint, or a constraint already fed a history (its parsers hold
state that its grammar does not describe).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DistributedError
from ..grammar import GrammarConstraint
from ..tokenizer import GemmaTokenizer


def refusal(processors: Sequence) -> str | None:
    """Why `processors` cannot be described to the followers (the start of a 400's message), or None."""
    for p in processors:
        if type(p) is not GrammarConstraint:  # a subclass may mask otherwise than its grammar says
            return (f"a logits processor other than the server's grammar constraints "
                    f"({type(p).__name__}: a Python callable cannot be sent to the other ranks)")
        if p.started:
            return "a grammar constraint that has already been used (make one per job)"
    return None


def describe(processors: Sequence) -> list[dict]:
    """Each processor as the followers rebuild it (JSON-ready); `refusal(processors)` must be None."""
    return [{"grammar": p.grammar, "eos": sorted(int(i) for i in p.vocab.eos_tokens),
             "vocab_size": int(p.vocab.vocab_size)} for p in processors]


def rebuild(descriptions: list[dict], tokenizer: GemmaTokenizer | None) -> tuple:
    """A follower's own processors from rank 0's `describe`, made with its own tokenizer."""
    if not descriptions:
        return ()
    if tokenizer is None:
        raise DistributedError("rank 0 sent a grammar-constrained job, but this rank's scheduler has no "
                               "tokenizer to build its constraint with")
    out = []
    for d in descriptions:
        constraint = GrammarConstraint(tokenizer, d["grammar"])
        mine = (sorted(int(i) for i in constraint.vocab.eos_tokens), int(constraint.vocab.vocab_size))
        if mine != (d["eos"], d["vocab_size"]):
            raise DistributedError(f"rank 0 masks a grammar with eos ids {d['eos']} over {d['vocab_size']} ids, "
                                   f"this rank's tokenizer gives {mine[0]} over {mine[1]}: the ranks would draw "
                                   "different tokens (serve one folder on every rank)")
        out.append(constraint)
    return tuple(out)
