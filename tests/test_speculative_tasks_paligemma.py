"""`PaliGemmaCausalLM.compile(speculative={...})`: generate() speculates and still gives keras-hub's ids.

Reference: keras-hub 0.32's recorded PaliGemmaCausalLM.generate outputs on the tiny presets
(tests/fixtures/keras_pali_generate.json, made by make_keras_pali_generate.py): one image + a string,
two images + prompts of different lengths (where keras-hub's lock-step loop re-reads the longer
prompt's tail causally), strip_prompt, a stop id and the dict form, every case unchanged by
speculation.  The draft is the tiny keras Gemma text preset, which shares the PaliGemma presets'
SentencePiece model (tests/fixtures/keras_gemma): a text Gemma with PaliGemma's vocabulary.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

import test_tasks_paligemma
from conftest import FIXTURES
from mlx_gemma import speculative
from mlx_gemma.errors import GenerationError
from mlx_gemma.speculative_control import FixedK
from mlx_gemma.tasks import GemmaCausalLM
from test_tasks_paligemma import KERAS

converted_presets_cache = test_tasks_paligemma.converted_presets_cache  # presets convert out of the home
keras_lms = test_tasks_paligemma.keras_lms  # the tiny presets, embeddings scaled as keras-hub's were


@pytest.fixture(autouse=True)
def fixed_k(monkeypatch):
    """k proposals every step: the adaptive controller would rightly switch off a draft as costly as the
    target, and these tests are about the ids speculation gives when it runs."""
    monkeypatch.setattr(speculative, "Adaptive", lambda k, **_: FixedK(k))


@pytest.fixture(scope="module")
def draft():
    return GemmaCausalLM.from_preset(FIXTURES / "keras_gemma", dtype="float32")


@pytest.mark.parametrize("name", list(KERAS))
def test_speculative_generate_matches_keras_hub(keras_lms, draft, name, monkeypatch):
    lm = keras_lms[name]
    counted = []
    original = speculative.SpeculativeStep.__init__

    def counting(self, *args, **kwargs):
        original(self, *args, **kwargs)
        counted.append(self.stats)

    monkeypatch.setattr(speculative.SpeculativeStep, "__init__", counting)
    try:
        for settings in ({"prompt_lookup": 2, "num_draft_tokens": 4}, {"draft_model": draft, "num_draft_tokens": 3},
                         {"draft_model": draft.backbone}):
            lm.compile(sampler="greedy", speculative=settings)
            assert lm.speculation is not None
            counted.clear()
            test_tasks_paligemma.test_generate_matches_keras_hub({name: lm}, name)  # every recorded case
            assert counted and sum(s.proposed for s in counted) > 0, settings  # it did speculate
    finally:
        lm.compile()
    assert lm.speculation is None


def test_sampling_with_speculation_runs_row_by_row(keras_lms, draft):
    """top-k sampling through the draft: ids in the vocabulary after each prompt, the prompts kept."""
    lm = keras_lms["keras_paligemma"]
    pixels, _ = test_tasks_paligemma.keras_images("keras_paligemma")
    lm.compile(sampler="top_k", speculative={"draft_model": draft})
    try:
        out = lm.generate({"images": list(pixels), "prompts": ["ocr\n", "detect cat ; dog\n"]},
                          stop_token_ids=None, strip_prompt=False)
    finally:
        lm.compile()
    assert [t.startswith(p) for t, p in zip(out, ["ocr\n", "detect cat ; dog\n"])] == [True, True]


def test_drafts_that_cannot_serve_paligemma_are_typed_errors(keras_lms, draft, monkeypatch):
    lm = keras_lms["keras_paligemma"]
    other = keras_lms["keras_paligemma2"]
    try:
        for bad in (other, other.backbone, other.model):
            with pytest.raises(GenerationError, match="PaliGemma draft would have to see the image"):
                lm.compile(speculative={"draft_model": bad})
        with pytest.raises(GenerationError, match="must be a GemmaCausalLM"):
            lm.compile(speculative={"draft_model": object()})
        # a text model whose rows stop below PaliGemma's <image> id (the draft's config cut short:
        # only its vocabulary size is read before the refusal)
        small = draft.backbone.model
        monkeypatch.setattr(small, "args", replace(small.args, vocab_size=lm.model.args.image_token_index))
        with pytest.raises(GenerationError, match="fewer than PaliGemma's"):
            lm.compile(speculative={"draft_model": small})
        with pytest.raises(GenerationError, match="not both"):
            lm.compile(speculative={"draft_model": draft, "prompt_lookup": 2})
        with pytest.raises(GenerationError, match="BeamSampler"):
            lm.compile(sampler="beam", speculative={"prompt_lookup": 2})
        assert lm.speculation is None and lm.sampler is not None  # a refused compile leaves the last one
    finally:
        lm.compile()
