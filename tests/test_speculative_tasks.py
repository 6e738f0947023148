"""`GemmaCausalLM.compile(sampler=..., speculative={...})`: generate() speculates and gives keras-hub's output.

Reference: keras-hub 0.32's recorded greedy `generate` outputs for the tiny keras presets
(tests/fixtures/keras_generate.json, made by make_keras_generate.py): strings, batches of prompts of
different lengths, strip_prompt, stop ids and the token-id dict form, unchanged by speculation.
"""

from __future__ import annotations

import json

import pytest

import test_tasks
from conftest import FIXTURES
from mlx_gemma.errors import GenerationError
from mlx_gemma.tasks import GemmaCausalLM

KERAS = json.loads((FIXTURES / "keras_generate.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """Two instances of each preset: a target and a draft (the same weights: it agrees with itself)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_GEMMA_CACHE", str(tmp_path_factory.getbasetemp() / "mlx_gemma_cache"))
        return {name: [GemmaCausalLM.from_preset(FIXTURES / name, dtype="float32") for _ in range(2)]
                for name in KERAS}


@pytest.mark.parametrize("name", list(KERAS))
def test_speculative_generate_matches_keras_hub(lms, name):
    lm, draft = lms[name]
    lm.compile(speculative={"draft_model": draft.backbone})  # a backbone drafts with its MLX model
    assert lm.speculation.draft_model is draft.model
    for speculative in ({"prompt_lookup": 2}, {"draft_model": draft, "num_draft_tokens": 3}):
        lm.compile(sampler="greedy", speculative=speculative)
        assert lm.speculation is not None
        test_tasks.test_generate_matches_keras_hub({name: lm}, name)  # every recorded case, as without
    lm.compile()  # back to keras-hub's default: no speculation
    assert lm.speculation is None


def test_bad_speculative_settings_are_typed_errors(lms):
    lm, draft = lms["keras_gemma"]
    for bad, match in (({"lookup": 3}, "takes a dict"), ([("prompt_lookup", 3)], "takes a dict"),
                       ({"prompt_lookup": 0}, "prompt_lookup"), ({"prompt_lookup": 2, "draft_model": draft}, "not both"),
                       ({"num_draft_tokens": 2}, "needs draft_model")):
        with pytest.raises(GenerationError, match=match):
            lm.compile(speculative=bad)
    with pytest.raises(GenerationError, match="BeamSampler"):
        lm.compile(sampler="beam", speculative={"prompt_lookup": 2})
    lm.compile()
