"""Gemma 4's MoE router and experts (models/moe.py) against transformers 5.25, fp32.

References: tests/fixtures/moe_reference.npz, written by
tests/fixtures/make_moe_reference.py from transformers' `Gemma4TextRouter`,
`Gemma4TextExperts` and the MoE half of `Gemma4TextDecoderLayer` (random tiny
weights, E=4 and E=8 experts, top-2, few and many tokens: the unsorted and the
sorted gather path); the oracle tests recompute them live.  Quantized experts
are checked against the float experts holding their dequantized weights.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FIXTURES

from mlx_gemma.loading import check_weights
from mlx_gemma.models import moe
from mlx_gemma.models.moe import Experts, Router, sanitize_experts

REFERENCE = FIXTURES / "moe_reference.npz"
CASES = ("e4k2_few", "e4k2_many", "e8k2_few", "e8k2_many")
EPS = 1e-6  # Gemma4TextConfig's rms_norm_eps, which the fixture keeps


def rel_err(ours, expected) -> float:
    expected = np.asarray(expected)
    return float(np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max())


def scaled_rms_norm(x: mx.array, weight: mx.array) -> mx.array:
    """transformers' Gemma4RMSNorm (x * pow(mean(x^2) + eps, -0.5) * w), for the block test's two norms."""
    return x * mx.power(mx.mean(x * x, axis=-1, keepdims=True) + EPS, -0.5) * weight


class Block(nn.Module):
    """A decoder block's MoE half, under transformers' names (router, experts) beside a dense Linear."""

    def __init__(self, experts: int, top_k: int, hidden: int = 32, width: int = 16):
        super().__init__()
        self.router = Router(hidden, experts, top_k, EPS)
        self.experts = Experts(experts, hidden, width, "gelu_pytorch_tanh")
        self.o_proj = nn.Linear(hidden, hidden, bias=False)  # a projection LoRA may adapt


class Stack(nn.Module):
    """The least a model offers the converter's quantizer and the tuner: `layers`, `float_prefixes`, `args`."""

    float_prefixes = ()

    def __init__(self, experts: int = 4, top_k: int = 2, hidden: int = 32, width: int = 16, n: int = 1):
        super().__init__()
        self.layers = [Block(experts, top_k, hidden, width) for _ in range(n)]
        self.args = type("Args", (), {"model_type": "moe_test", "hidden_size": hidden})()


def case_data(case: str) -> dict[str, np.ndarray]:
    ref = np.load(REFERENCE)
    return {k.split("/", 1)[1]: ref[k] for k in ref.files if k.startswith(case + "/")}


def stack_for(ref: dict[str, np.ndarray]) -> Stack:
    """A one-block Stack holding the reference's weights, loaded through sanitize_experts (HF names)."""
    experts, hidden = ref["router.proj.weight"].shape
    stack = Stack(experts, ref["router_indices"].shape[1], hidden, ref["experts.down_proj"].shape[2])
    hf = {f"layers.0.{k}": mx.array(ref[k]) for k in ref if k.startswith(("router.", "experts."))}
    weights = sanitize_experts(hf)
    weights["layers.0.o_proj.weight"] = stack.layers[0].o_proj.weight
    check_weights(stack, weights, None)
    stack.load_weights(list(weights.items()), strict=True)
    return stack


# --- against transformers (fixture) ------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_router_matches_transformers(case):
    ref = case_data(case)
    block = stack_for(ref).layers[0]
    weights, indices = block.router(mx.array(ref["residual"].reshape(-1, ref["residual"].shape[-1])))
    assert indices.dtype == mx.uint32 and weights.dtype == mx.float32
    np.testing.assert_array_equal(np.array(indices), ref["router_indices"])  # largest first, as torch.topk
    assert rel_err(weights, ref["router_weights"]) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_experts_match_transformers(case):
    ref = case_data(case)
    block = stack_for(ref).layers[0]
    out = block.experts(mx.array(ref["experts_input"]), mx.array(ref["router_indices"]), mx.array(ref["router_weights"]))
    assert out.shape == ref["experts"].shape
    assert rel_err(out, ref["experts"]) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_router_and_experts_block_matches_transformers(case):
    """The decoder's MoE half: the router reads the residual, the experts its pre_feedforward_layernorm_2."""
    ref = case_data(case)
    block = stack_for(ref).layers[0]
    residual = mx.array(ref["residual"])
    flat = residual.reshape(-1, residual.shape[-1])
    weights, indices = block.router(flat)
    mixed = block.experts(scaled_rms_norm(flat, mx.array(ref["pre_feedforward_layernorm_2.weight"])), indices, weights)
    out = scaled_rms_norm(mixed.reshape(residual.shape), mx.array(ref["post_feedforward_layernorm_2.weight"]))
    assert rel_err(out, ref["block"]) < 1e-5


@pytest.mark.oracle
@pytest.mark.parametrize("case", CASES)
def test_fixture_is_what_transformers_computes(case, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(FIXTURES))
    from make_moe_reference import reference  # the fixture script; it imports torch and transformers

    live, stored = reference(case), case_data(case)
    assert live.keys() == stored.keys()
    for name in live:
        np.testing.assert_allclose(live[name], stored[name], rtol=0, atol=1e-6, err_msg=name)


def test_both_gather_paths_cover_the_fixture():
    """The few-token cases run unsorted, the many-token ones sorted by expert."""
    for case in CASES:
        pairs = case_data(case)["router_indices"].size
        assert (pairs >= moe.SORT_MIN_PAIRS) == case.endswith("many")


@pytest.mark.parametrize("case", ["e4k2_few", "e8k2_many"])
def test_sorted_and_unsorted_paths_agree(case, monkeypatch):
    ref = case_data(case)
    experts = stack_for(ref).layers[0].experts
    args = [mx.array(ref[k]) for k in ("experts_input", "router_indices", "router_weights")]
    monkeypatch.setattr(moe, "SORT_MIN_PAIRS", 1)
    sorted_out = np.array(experts(*args))
    monkeypatch.setattr(moe, "SORT_MIN_PAIRS", 1 << 30)
    unsorted_out = np.array(experts(*args))
    assert rel_err(sorted_out, unsorted_out) < 1e-6
