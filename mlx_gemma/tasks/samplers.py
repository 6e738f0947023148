"""keras-hub style sampler objects for `GemmaCausalLM.compile(sampler=...)`.

Same names, arguments and defaults as `keras_hub.samplers` (0.32); each one
hands the decode loop an `mlx_gemma.samplers` sampler (log-probabilities [B, V]
-> ids [B]), except beam and contrastive search, which run
`mlx_gemma.search`.  A seeded sampler keeps its PRNG state across `generate`
calls, as keras-hub's `SeedGenerator` does; the draws themselves are MLX's, not
JAX's, so seeded runs repeat here but do not reproduce keras-hub's tokens.

`get_sampler` takes a name ("greedy", "top_k", "top_p", "random", "beam",
"contrastive"), one of these objects, a keras-hub sampler object (read by
class name and attributes), or any mlx_gemma sampler callable.
"""

from __future__ import annotations


import mlx.core as mx

from ..arguments import integer_arg, real_arg
from ..errors import GenerationError
from ..samplers import CategoricalSampler
from ..samplers import apply_temperature, apply_top_k, apply_top_p, greedy


def _temperature(value) -> float:
    return real_arg("temperature", value, above=0, error=GenerationError)


class Sampler:
    """Base: `step_sampler()` gives the per-step sampler the decode loop calls."""

    search = None  # "beam" / "contrastive" for the samplers mlx_gemma.search runs

    def __init__(self, temperature: float = 1.0):
        self.temperature = _temperature(temperature)
        self._step = None

    def step_sampler(self):
        if self._step is None:  # made once, so a seeded PRNG carries on across generate() calls
            self._step = self._make()
        return self._step

    def _make(self):
        raise GenerationError(f"{type(self).__name__} has no per-step sampler: it runs through mlx_gemma.search")

    def get_config(self) -> dict:
        return {"temperature": self.temperature}


class GreedySampler(Sampler):
    """The most likely token (temperature cannot change the argmax)."""

    def _make(self):
        return greedy


class RandomSampler(Sampler):
    """A draw from the whole (temperature-scaled) distribution."""

    def __init__(self, seed: int | None = None, temperature: float = 1.0):
        super().__init__(temperature)
        self.seed = seed

    def _make(self):
        return CategoricalSampler(temp=self.temperature, seed=self.seed)


class TopKSampler(Sampler):
    """A draw from the k most likely tokens."""

    def __init__(self, k: int = 5, seed: int | None = None, temperature: float = 1.0):
        super().__init__(temperature)
        integer_arg("k", k, 1, error=GenerationError)
        self.k, self.seed = k, seed

    def _make(self):
        return CategoricalSampler(temp=self.temperature, top_k=self.k, seed=self.seed)


class _NucleusWithinTopK(CategoricalSampler):
    """keras-hub's TopPSampler: the nucleus of the *full* distribution, then at most k tokens.

    (mlx_gemma.samplers.CategoricalSampler, like Hugging Face, renormalises after top-k before
    the nucleus; keras-hub takes the cumulative mass over the full softmax.)
    """

    def filter(self, logprobs: mx.array) -> mx.array:
        out = logprobs.astype(mx.float32)
        if self.temp != 1.0:
            out = apply_temperature(out, self.temp)
        return apply_top_k(apply_top_p(out, self.top_p), self.top_k)


class TopPSampler(Sampler):
    """A draw from the smallest set of likeliest tokens whose mass reaches p (and at most k of them)."""

    def __init__(self, p: float = 0.1, k: int | None = None, seed: int | None = None, temperature: float = 1.0):
        super().__init__(temperature)
        real_arg("p", p, above=0, high=1, error=GenerationError)
        if k is not None:
            integer_arg("k (or None)", k, 1, error=GenerationError)
        self.p, self.k, self.seed = float(p), k, seed

    def _make(self):
        return _NucleusWithinTopK(temp=self.temperature, top_k=self.k or 0, top_p=self.p, seed=self.seed)


class BeamSampler(Sampler):
    """Beam search (mlx_gemma.search.beam_search: transformers' bookkeeping, length_penalty 1).

    Unlike keras-hub's, a beam that emits a stop id is finished and kept aside
    rather than extended past it.  `return_all_beams` is keras-hub's flag for
    calling the sampler directly; `generate` returns the best beam only.
    """

    search = "beam"

    def __init__(self, num_beams: int = 5, return_all_beams: bool = False, temperature: float = 1.0):
        super().__init__(temperature)
        integer_arg("num_beams", num_beams, 1, error=GenerationError)
        if return_all_beams:
            raise GenerationError("generate() returns the best beam; for every beam call "
                                  "mlx_gemma.search.beam_search(model, prompt_ids, max_tokens, num_return=...)")
        if self.temperature != 1.0:
            raise GenerationError("beam search ranks by the model's own log-probabilities: temperature must be 1")
        self.num_beams = num_beams


class ContrastiveSampler(Sampler):
    """Contrastive search (mlx_gemma.search.contrastive_search): top k, degeneration penalty alpha."""

    search = "contrastive"

    def __init__(self, k: int = 5, alpha: float = 0.6, temperature: float = 1.0):
        super().__init__(temperature)
        integer_arg("k", k, 1, error=GenerationError)
        real_arg("alpha", alpha, 0, 1, error=GenerationError)
        if self.temperature != 1.0:
            raise GenerationError("contrastive search uses the model's own probabilities: temperature must be 1")
        self.k, self.alpha = k, float(alpha)


class _CallableSampler(Sampler):
    """Any mlx_gemma sampler: log-probabilities [B, V] -> ids [B]."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def _make(self):
        return self.fn


_BY_NAME = {
    "greedy": GreedySampler, "random": RandomSampler, "top_k": TopKSampler, "top_p": TopPSampler,
    "beam": BeamSampler, "contrastive": ContrastiveSampler,
}
# keras_hub.samplers class name -> (ours, the attributes its constructor takes).
_KERAS_CLASSES = {
    "GreedySampler": (GreedySampler, ("temperature",)),
    "RandomSampler": (RandomSampler, ("seed", "temperature")),
    "TopKSampler": (TopKSampler, ("k", "seed", "temperature")),
    "TopPSampler": (TopPSampler, ("p", "k", "seed", "temperature")),
    "BeamSampler": (BeamSampler, ("num_beams", "return_all_beams", "temperature")),
    "ContrastiveSampler": (ContrastiveSampler, ("k", "alpha", "temperature")),
}


def get_sampler(identifier) -> Sampler:
    if isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, str):
        if identifier not in _BY_NAME:
            raise GenerationError(f"unknown sampler {identifier!r}; use one of {', '.join(_BY_NAME)} or a sampler object")
        return _BY_NAME[identifier]()
    known = _KERAS_CLASSES.get(type(identifier).__name__)
    if known is not None and type(identifier).__module__.startswith(("keras_hub", "keras_nlp")):
        cls, names = known
        return cls(**{n: getattr(identifier, n) for n in names if hasattr(identifier, n)})
    if callable(identifier):
        return _CallableSampler(identifier)
    raise GenerationError(f"cannot use {identifier!r} as a sampler: give a name, a sampler object or a callable")
