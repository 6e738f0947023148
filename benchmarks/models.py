"""The benchmark models, prepared once into `$MLX_GEMMA_CACHE/bench/` and reused.

* the packaged Gemma 3 270M in bf16 (the default model folder) and in 4-bit
  (our converter, group 64: the folder loads in both libraries unchanged);
  where the packaged model is not installed (a GPU machine reached without
  the network), random weights in its exact shape, with its real config and
  tokenizer from tests/fixtures/gemma3_270m;
* a Gemma 2 2B-shaped model with random weights (the shape of
  google/gemma-2-2b: 26 layers, hidden 2304, 8 query / 4 key-value heads of 256,
  MLP 9216, window 4096, soft-caps 50 / 30), in bf16 and 4-bit.  Its vocabulary
  is the packaged tokenizer's 262,144 pieces (2B's is 256,000; 2.4% more
  embedding rows), so that both libraries can tokenize with a real tokenizer.
  `num_layers` can cut it down (same widths) for slow machines;
* a Gemma 4 E2B-shaped model with random weights (the text config of
  google/gemma-4-E2B: 35 layers, 4 sliding : 1 global, hidden 1536, 8 query heads, one
  key-value head of 256 (512 on global layers), window 512, MLP 6144 (doubled on the
  last 20 layers, which reuse earlier layers' keys and values), per-layer inputs of
  256 from a 262,144-row table, soft-cap 30), in bf16 and 4-bit, cut to whole
  groups of 5 layers that keep E2B's share of KV-shared ones (10 layers by default
  in bench_generate: 5 own their keys and values, 5 share).  The vocabulary is the
  packaged Gemma 3 tokenizer's (also 262,144 pieces), as for the 2B shape.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_gemma.convert import convert
from mlx_gemma.default_model import cache_dir, default_model_path
from mlx_gemma.errors import ModelFileError

# What both random-weight shapes share: the packaged tokenizer's vocabulary and ids, bf16, a tied head.
_SHARED = {"vocab_size": 262144, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
           "torch_dtype": "bfloat16"}

GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    **_SHARED,
}


# google/gemma-4-E2B's text config (as mlx-lm 0.32's gemma4_text ModelArgs defaults spell it too).
_E2B_GROUP = ["sliding_attention"] * 4 + ["full_attention"]
GEMMA4_E2B = {
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "hidden_size": 1536,
    "intermediate_size": 6144,
    "num_hidden_layers": 35,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "global_head_dim": 512,
    "sliding_window": 512,
    "layer_types": _E2B_GROUP * 7,
    "num_kv_shared_layers": 20,
    "hidden_size_per_layer_input": 256,
    "vocab_size_per_layer_input": 262144,
    "use_double_wide_mlp": True,
    "attention_k_eq_v": False,
    "enable_moe_block": False,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072,
    "rope_parameters": {
        "full_attention": {"rope_type": "proportional", "rope_theta": 1000000.0, "partial_rotary_factor": 0.25},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
    **_SHARED,
}

_FIXTURE = Path(__file__).parent.parent / "tests" / "fixtures" / "gemma3_270m"  # real config and tokenizer


def bench_dir() -> Path:
    return cache_dir() / "bench"


def gemma3_270m(bits: int | None) -> Path:
    try:
        source = default_model_path()
        name = "gemma-3-270m"
    except ModelFileError:  # the packaged model is not installed
        source, name = _gemma3_270m_random(), "gemma-3-270m-random"
    return _quantized(source, name, bits)


def _quantized(source: Path, name: str, bits: int | None) -> Path:
    """`source` itself (bits None), or its `bits`-bit conversion (group 64), made once."""
    if bits is None:
        return source
    dest = bench_dir() / f"{name}-{bits}bit"
    if not (dest / "config.json").is_file():
        convert(source, mlx_path=dest, quantize=True, q_bits=bits, q_group_size=64)
    return dest


def _gemma3_270m_random() -> Path:
    import json

    from mlx_gemma.convert.writer import write_model_folder

    dest = bench_dir() / "gemma-3-270m-random-bf16"
    if not (dest / "config.json").is_file():
        config = {**json.loads((_FIXTURE / "config.json").read_text()), "torch_dtype": "bfloat16"}
        weights = _random_weights(config)
        for i in range(config["num_hidden_layers"]):
            for norm in ("q_norm", "k_norm"):
                weights[f"model.layers.{i}.self_attn.{norm}.weight"] = mx.zeros((config["head_dim"],), mx.bfloat16)
        write_model_folder(dest, config, weights, _FIXTURE / "tokenizer.model",
                           json.loads((_FIXTURE / "generation_config.json").read_text()))
    return dest


def _normal_maker(seed: int = 0):
    """normal(shape): bf16 draws of N(0, 0.02), each from a key of its own."""
    key = mx.random.key(seed)

    def normal(shape):
        nonlocal key
        key, sub = mx.random.split(key)
        return (mx.random.normal(shape, key=sub) * 0.02).astype(mx.bfloat16)

    return normal


def _random_weights(config: dict) -> dict[str, mx.array]:
    """Gemma 2/3 block weights (no q/k norms): normal(0, 0.02) matrices, zero norm offsets."""
    h, f, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    normal = _normal_maker()

    weights = {"model.embed_tokens.weight": normal((config["vocab_size"], h)),
               "model.norm.weight": mx.zeros((h,), mx.bfloat16)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": normal((q, h)),
            p + "self_attn.k_proj.weight": normal((kv, h)),
            p + "self_attn.v_proj.weight": normal((kv, h)),
            p + "self_attn.o_proj.weight": normal((h, q)),
            p + "mlp.gate_proj.weight": normal((f, h)),
            p + "mlp.up_proj.weight": normal((f, h)),
            p + "mlp.down_proj.weight": normal((h, f)),
        })
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            weights[p + norm + ".weight"] = mx.zeros((h,), mx.bfloat16)
    return weights


def gemma2_2b_random(bits: int | None, num_layers: int | None = None) -> Path:
    from mlx_gemma.convert.writer import write_model_folder

    layers = num_layers or GEMMA2_2B["num_hidden_layers"]
    name = f"gemma-2-2b-random-{layers}l"
    float_dest = bench_dir() / f"{name}-bf16"
    if not (float_dest / "config.json").is_file():
        config = {**GEMMA2_2B, "num_hidden_layers": layers}
        tokenizer = _FIXTURE / "tokenizer.model"  # the packaged model's, committed: works without it
        write_model_folder(float_dest, config, _random_weights(config), tokenizer,
                           {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0})
    return _quantized(float_dest, name, bits)


def gemma4_e2b_config(num_layers: int | None = None, **overrides) -> dict:
    """E2B's config cut to `num_layers` (whole groups of 4 sliding + 1 global layer), keeping its share
    of layers that own their keys and values (3 groups of 7; at least one), then `overrides`."""
    layers = num_layers or GEMMA4_E2B["num_hidden_layers"]
    if layers % 5:
        raise ValueError(f"a Gemma 4 E2B-shaped model has whole groups of 5 layers, not {layers}")
    groups = layers // 5
    own = max(1, round(groups * 3 / 7))
    return {**GEMMA4_E2B, "num_hidden_layers": layers, "layer_types": _E2B_GROUP * groups,
            "num_kv_shared_layers": layers - 5 * own, **overrides}


def _gemma4_weights(config: dict) -> dict[str, mx.array]:
    """Gemma 4 text weights under transformers' names: normal(0, 0.02) matrices; norms, layer scalars
    ones (Gemma 4's RMSNorm multiplies by its weight itself).  KV-shared layers have no k/v weights."""
    h, p, n = config["hidden_size"], config["hidden_size_per_layer_input"], config["num_hidden_layers"]
    normal, ones = _normal_maker(), lambda size: mx.ones((size,), mx.bfloat16)
    weights = {"model.embed_tokens.weight": normal((config["vocab_size"], h)),
               "model.embed_tokens_per_layer.weight": normal((config["vocab_size_per_layer_input"], n * p)),
               "model.per_layer_model_projection.weight": normal((n * p, h)),
               "model.per_layer_projection_norm.weight": ones(p), "model.norm.weight": ones(h)}
    first_shared = n - config["num_kv_shared_layers"]
    for i, kind in enumerate(config["layer_types"]):
        hd = config["global_head_dim"] if kind == "full_attention" else config["head_dim"]
        q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
        f = config["intermediate_size"] * (2 if config["use_double_wide_mlp"] and i >= first_shared else 1)
        at = f"model.layers.{i}."
        weights.update({at + "self_attn.q_proj.weight": normal((q, h)), at + "self_attn.q_norm.weight": ones(hd),
                        at + "self_attn.o_proj.weight": normal((h, q)), at + "mlp.gate_proj.weight": normal((f, h)),
                        at + "mlp.up_proj.weight": normal((f, h)), at + "mlp.down_proj.weight": normal((h, f)),
                        at + "per_layer_input_gate.weight": normal((p, h)),
                        at + "per_layer_projection.weight": normal((h, p)), at + "layer_scalar": ones(1)})
        if i < first_shared:  # a KV-shared layer attends with an earlier layer's keys and values
            weights.update({at + "self_attn.k_proj.weight": normal((kv, h)),
                            at + "self_attn.v_proj.weight": normal((kv, h)), at + "self_attn.k_norm.weight": ones(hd)})
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            weights[at + norm + ".weight"] = ones(h)
    return weights


def gemma4_folder(config: dict, name: str, bits: int | None) -> Path:
    """A random-weight Gemma 4 text folder of `config` (made once, as `name`), or its `bits`-bit conversion."""
    from mlx_gemma.convert.writer import write_model_folder

    float_dest = bench_dir() / f"{name}-bf16"
    if not (float_dest / "config.json").is_file():
        write_model_folder(float_dest, config, _gemma4_weights(config), _FIXTURE / "tokenizer.model",
                           {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0})
    return _quantized(float_dest, name, bits)


def gemma4_e2b_random(bits: int | None, num_layers: int | None = None) -> Path:
    config = gemma4_e2b_config(num_layers)
    return gemma4_folder(config, f"gemma-4-e2b-random-{config['num_hidden_layers']}l", bits)
