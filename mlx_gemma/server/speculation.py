"""The server's speculative decoding: its flags, the draft model they load, and each scheduler's policy.

`--draft-model D` and `--num-draft-tokens K` are mlx-lm's server flags (K defaults to 3 there and
here); `--prompt-lookup N` is ours (generate's flag).  They set what a request gets by default; a
request changes it with `num_draft_tokens` (mlx-lm's per-request field; 0: no speculation) and
`prompt_lookup` (true / an n-gram length / false).  A row speculates only while it decodes alone
(mlx_gemma/batch_speculation.py), and the reply's `usage.speculative` says how many tokens were
proposed and how many the model kept.  Across ranks (--pipeline / --tensor-parallel) the draft model is
loaded on rank 0 only, and rank 0's proposals are every rank's (distributed/speculation.py).
"""

from __future__ import annotations

import argparse
import functools

import mlx.core as mx
from mlx.utils import tree_flatten

from ..assistant_proposer import is_assistant
from ..batch_speculation import SpeculativeBatchPolicy
from ..distributed.speculation import ON_RANK_ZERO, Channel, RankSpeculation
from ..errors import MlxGemmaError
from ..loading import load
from ..proposers import Speculation, same_vocabulary


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-model", default=None,
                   help="speculative decoding: a smaller model folder or hub id with the same tokenizer, used while "
                        "a request decodes alone")
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="most tokens proposed per speculative step (default 3; a request's num_draft_tokens wins)")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="speculative decoding without a draft: propose what followed the last N-gram in the text "
                        "(a request's prompt_lookup wins)")


class ServerSpeculation:
    """The flags' default speculation (the draft model loaded once), and the batch policy each model gets."""

    def __init__(self, args, load_draft: bool = True):
        """`load_draft` False: a follower rank, which holds a stand-in for the draft (rank 0 drafts)."""
        if args.num_draft_tokens is not None and args.num_draft_tokens < 1:
            raise MlxGemmaError(f"--num-draft-tokens must be at least 1, got {args.num_draft_tokens}")
        if args.prompt_lookup is not None and args.prompt_lookup < 1:
            raise MlxGemmaError(f"--prompt-lookup must be an n-gram length of at least 1, got {args.prompt_lookup}")
        if args.draft_model is not None and args.prompt_lookup is not None:
            raise MlxGemmaError("give --draft-model or --prompt-lookup, not both")
        if args.draft_model is not None and len(args.model) > 1:
            raise MlxGemmaError("--draft-model applies to one model: give a single --model with it")
        draft = None
        if args.draft_model is not None and not load_draft:
            draft = ON_RANK_ZERO
        elif args.draft_model is not None:
            draft = load(args.draft_model)
            if is_assistant(draft[0]):
                raise MlxGemmaError(f"--draft-model {args.draft_model}: a Gemma 4 assistant drafter reads the target's "
                                    "states from the prompt on, which the server's batch does not give it; use a "
                                    "draft Gemma or --prompt-lookup")
            # Settled here: the scheduler's thread cannot run arrays left lazy on this one (as cli.py's models).
            mx.eval([v for _, v in tree_flatten(draft[0]) if isinstance(v, mx.array)])
        self.flag = args.draft_model
        k = args.num_draft_tokens
        self.default = Speculation(draft, args.prompt_lookup, k or 3) if draft or args.prompt_lookup else None
        if self.default is None and k is not None:
            raise MlxGemmaError("--num-draft-tokens needs --draft-model or --prompt-lookup")

    def policy(self, tokenizer, group=None):
        """The scheduler's `policy` for a model with `tokenizer` (the draft must share its vocabulary); with
        `group`, a rank's when serving across ranks."""
        if self.default is not None and self.default.draft_model not in (None, ON_RANK_ZERO):
            try:
                same_vocabulary(tokenizer, self.default.draft_model[1])
            except MlxGemmaError as e:
                raise MlxGemmaError(f"--draft-model {self.flag}: {e}") from None
        if group is not None:
            return functools.partial(RankSpeculation, speculation=self.default, channel=Channel(group))
        return functools.partial(SpeculativeBatchPolicy, speculation=self.default)
