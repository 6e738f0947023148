"""MedGemma's keras-hub preset names -> Google's Hugging Face repositories, loaded as Gemma 3.

The repositories are those of Google's MedGemma collection on the hub (their model cards); the
shapes are checked here against what those configs say (Gemma 3 4B / 27B, with SigLIP at 896 px
and 256 soft tokens, 262,208 embedding rows), and in test_tasks.py against keras-hub's recorded
parameter counts.  Nothing is downloaded: random weights of each shape are built lazily.
"""

from __future__ import annotations

import pytest

from mlx_gemma.loading import build_model
from mlx_gemma.models import gemma3, gemma3_vlm
from mlx_gemma.tasks import GemmaBackbone
from mlx_gemma.tasks.presets import PRESETS, hf_repo_of

MEDGEMMA = {  # preset: (repository, images, hidden, layers, instruct)
    "medgemma_4b": ("google/medgemma-4b-pt", True, 2560, 34, False),
    "medgemma_instruct_4b": ("google/medgemma-4b-it", True, 2560, 34, True),
    "medgemma_instruct_27b": ("google/medgemma-27b-it", True, 5376, 62, True),
    "medgemma_instruct_27b_text": ("google/medgemma-27b-text-it", False, 5376, 62, True),
    "medgemma_1.5_instruct_4b": ("google/medgemma-1.5-4b-it", True, 2560, 34, True),
}


@pytest.mark.parametrize("name", sorted(MEDGEMMA))
def test_medgemma_presets_map_to_their_repos_and_gemma3_shapes(name):
    repo, images, hidden, layers, instruct = MEDGEMMA[name]
    preset = PRESETS[name]
    assert hf_repo_of(name) == repo and preset.instruct == instruct
    assert preset.kaggle == f"kaggle://keras/medgemma/keras/{name}/1"
    model = build_model(preset.hf_config)  # lazy: nothing allocated
    assert isinstance(model, gemma3_vlm.Model if images else gemma3.Model)
    args = model.args.text if images else model.args
    assert (args.hidden_size, args.num_hidden_layers, args.vocab_size) == (hidden, layers,
                                                                          262_208 if images else 262_144)
    if images:
        spec = model.image_input
        assert (spec.image_size, spec.num_tokens, spec.token_id, spec.start_id) == (896, 256, 262_144, 255_999)
    backbone = GemmaBackbone.from_preset(name, load_weights=False)  # the language half, as for Gemma 3
    assert (backbone.hidden_dim, backbone.num_layers) == (hidden, layers)
