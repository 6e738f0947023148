"""keras-hub style tasks: `GemmaCausalLM`, `GemmaBackbone`, `GemmaCausalLMPreprocessor`, presets;
`PaliGemmaCausalLM` and its backbone / preprocessor / tokenizer (`pali_gemma*.py`);
`Gemma3TextEmbedder` (EmbeddingGemma, `text_embedder.py`); `Gemma3CausalLM` with images (`gemma3_causal_lm.py`);
`Gemma4CausalLM` with images and audio (`gemma4_causal_lm.py`).

    lm = mlx_gemma.GemmaCausalLM.from_preset("gemma2_instruct_2b_en")
    lm.generate("<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n", max_length=64)

Thin layers over the rest of mlx_gemma: presets resolve to model folders
(`presets.py`), the backbone wraps an mlx_gemma model (`backbone.py`), the
preprocessor packs ids as keras-hub does (`preprocessor.py`), generation runs
mlx_gemma's decode loop with keras-hub's semantics (`causal_lm_generation.py`,
`samplers.py`, `causal_lm.py`), and `causal_lm_training.py` is keras-hub's
enable_lora / fit / evaluate on `tuner/` (`causal_lm_data.py`: their batches, cut to their longest row).  The tokenizer (`tokenizer.py`) is `mlx_gemma.tokenizer.GemmaTokenizer`,
which also speaks keras-hub's tokenizer interface, plus `from_preset`.
"""

from .backbone import GemmaBackbone
from .causal_lm import GemmaCausalLM
from .gemma3_causal_lm import Gemma3CausalLM, Gemma3CausalLMPreprocessor
from .gemma4_causal_lm import Gemma4CausalLM, Gemma4CausalLMPreprocessor
from .pali_gemma import PaliGemmaCausalLM, PaliGemmaCausalLMPreprocessor, PaliGemmaTokenizer
from .pali_gemma_backbone import PaliGemmaBackbone
from .pali_gemma_presets import PALI_PRESETS, pali_preset_names
from .presets import GEMMA4_PRESETS, PRESETS, preset_names
from .preprocessor import GemmaCausalLMPreprocessor
from .text_embedder import Gemma3TextEmbedder
from .tokenizer import GemmaTokenizer
from .samplers import (
    BeamSampler,
    ContrastiveSampler,
    GreedySampler,
    RandomSampler,
    Sampler,
    TopKSampler,
    TopPSampler,
    get_sampler,
)

__all__ = [
    "GemmaBackbone", "GemmaCausalLM", "GemmaCausalLMPreprocessor", "GemmaTokenizer", "PRESETS", "preset_names",
    "PaliGemmaBackbone", "PaliGemmaCausalLM", "PaliGemmaCausalLMPreprocessor", "PaliGemmaTokenizer",
    "PALI_PRESETS", "pali_preset_names", "Gemma3TextEmbedder", "Gemma3CausalLM", "Gemma3CausalLMPreprocessor",
    "Gemma4CausalLM", "Gemma4CausalLMPreprocessor", "GEMMA4_PRESETS",
    "Sampler", "GreedySampler", "RandomSampler", "TopKSampler", "TopPSampler", "BeamSampler",
    "ContrastiveSampler", "get_sampler",
]
