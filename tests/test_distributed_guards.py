"""What cannot run across ranks is refused up front, on every rank; the ranks agree on the prefill chunk;
the chat command line runs across ranks (issue 23).

The fast tests give a whole model a `share` (models/base.RankShare) in this process, which is what each
guard reads.  Three launches of `mlx.launch -n 2 --backend ring` check the real thing: the guards and a
mixed-quantization pipeline (tests/distributed_scripts/pipeline_guards.py), and `python -m mlx_gemma.chat`
with --pipeline and with --tensor-parallel against one process's ChatSession.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlx_gemma
from conftest import FIXTURES
from mlx_gemma.assistant_proposer import AssistantDrafter
from mlx_gemma.chat import ChatSession
from mlx_gemma.convert import convert
from mlx_gemma.engine import CPU_PREFILL_STEP_SIZE, CPU_QUANTIZED_PREFILL_STEP_SIZE, default_prefill_step
from mlx_gemma.errors import DistributedError, GenerationError, PromptCacheError
from mlx_gemma.generate import main as generate_main, stream_generate
from mlx_gemma.models import RankShare
from mlx_gemma.prompt_cache import PromptCache, save_prompt_cache
from mlx_gemma.score import score
from mlx_gemma.search import contrastive_search
from mlx_gemma.tensorfile import load_file, save_file
from test_distributed_pipeline import MLX_LAUNCH, SCRIPTS, launch

FOLDER = FIXTURES / "tiny_gemma3"
PIPELINE_RANK = RankShare("pipeline", 1, 2, quantized=False)
TENSOR_RANK = RankShare("tensor", 0, 2, quantized=False)


@pytest.fixture
def shared_model():
    """A whole tiny Gemma 3 standing in for one rank: each test sets its `share`."""
    model, tokenizer = mlx_gemma.load(FOLDER)
    return model, tokenizer


# ----- the guards, in this process ------------------------------------------------------------


def test_what_reads_hidden_states_refuses_a_pipeline_rank(shared_model):
    model, _ = shared_model
    want = list(contrastive_search(model, [2, 5, 7], max_tokens=3))
    model.share = PIPELINE_RANK
    with pytest.raises(DistributedError, match="rank 1: contrastive search compares final hidden states"):
        contrastive_search(model, [2, 5, 7], max_tokens=3)  # at the call, before a token is asked for
    with pytest.raises(DistributedError, match="rank 1: score.. runs the whole layer stack"):
        score(model, mx.array([[2, 5, 7]]))
    # A tensor-parallel rank holds the whole residual stream: both run.
    model.share = TENSOR_RANK
    assert list(contrastive_search(model, [2, 5, 7], max_tokens=3)) == want
    assert score(model, mx.array([[2, 5, 7]])).shape == (1, 3, model.args.vocab_size)
    # One pipeline rank is the whole model.
    model.share = RankShare("pipeline", 0, 1, quantized=False)
    assert list(contrastive_search(model, [2, 5, 7], max_tokens=3)) == want


@pytest.mark.parametrize("share", [PIPELINE_RANK, TENSOR_RANK])
def test_the_assistant_drafter_refuses_a_distributed_target(share):
    target, tokenizer = mlx_gemma.load(FIXTURES / "tiny_gemma4_e2b")
    drafter, _ = mlx_gemma.load(FIXTURES / "tiny_gemma4_assistant")
    assert len(list(stream_generate(target, tokenizer, [2, 5, 6], max_tokens=3, draft_model=drafter))) == 3
    target.share = share
    with pytest.raises(DistributedError, match=f"rank {share.rank}: a gemma4_assistant drafter reads"):
        list(stream_generate(target, tokenizer, [2, 5, 6], max_tokens=3, draft_model=drafter))
    with pytest.raises(DistributedError):
        AssistantDrafter(drafter).observe(target, target.make_cache(), mx.zeros((1, target.args.hidden_size)))


def test_the_prefill_chunk_follows_the_agreed_share(shared_model, tmp_path):
    if mx.default_device() != mx.cpu:
        pytest.skip("the CPU's chunk sizes")  # CI runs on the CPU; a GPU picks by soft-capping alone
    model, _ = shared_model
    assert default_prefill_step(model) == CPU_PREFILL_STEP_SIZE
    model.share = RankShare("pipeline", 0, 2, quantized=True)  # another rank holds quantized layers
    assert default_prefill_step(model) == CPU_QUANTIZED_PREFILL_STEP_SIZE
    assert default_prefill_step(model, rows=4) == CPU_QUANTIZED_PREFILL_STEP_SIZE // 4
    q = convert(FOLDER, mlx_path=tmp_path / "q", quantize=True, q_group_size=32, progress=False)
    quantized, _ = mlx_gemma.load(q)
    assert default_prefill_step(quantized) == CPU_QUANTIZED_PREFILL_STEP_SIZE
    quantized.share = RankShare("pipeline", 1, 2, quantized=False)  # as the ranks agreed: none quantized
    assert default_prefill_step(quantized) == CPU_PREFILL_STEP_SIZE


def test_prompt_cache_files_refuse_a_rank_share(shared_model, tmp_path):
    model, _ = shared_model
    whole_cache = PromptCache(model)
    whole_cache.extend(model, [2, 5, 7, 9])
    save_prompt_cache(tmp_path / "whole.safetensors", whole_cache)  # a whole model's cache saves
    for share in (PIPELINE_RANK, TENSOR_RANK):
        model.share = share
        cache = PromptCache(model)  # in memory a rank keeps one (chat, between turns)
        cache.extend(model, [2, 5, 7, 9])
        with pytest.raises(GenerationError, match="a distributed rank's prompt cache cannot be saved"):
            save_prompt_cache(tmp_path / "rank.safetensors", cache)
        assert not (tmp_path / "rank.safetensors").exists()
        with pytest.raises(PromptCacheError, match=f"does not fit rank {share.rank} of a {share.strategy}-parallel"):
            whole_cache.check(model)
        model.share = None


@pytest.mark.parametrize("flag", ["--pipeline", "--tensor-parallel"])
def test_generate_refuses_a_prompt_cache_file_across_ranks_before_loading(flag, tmp_path, capsys):
    missing = tmp_path / "never_read.safetensors"  # refused before the file (or the model) is read
    assert generate_main(["--model", str(FOLDER), "--prompt", "hi", "--prompt-cache-file", str(missing), flag]) == 2
    err = capsys.readouterr().err
    assert "--prompt-cache-file with --pipeline / --tensor-parallel" in err and "never_read" not in err


# ----- two ranks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """tiny Gemma 3 with its last layer 4-bit (from a converted copy) and the rest float: a 2-rank pipeline
    then puts float layers only on rank 0 and the quantized layer on rank 1."""
    tmp = tmp_path_factory.mktemp("mixed")
    q = convert(FOLDER, mlx_path=tmp / "q", quantize=True, q_group_size=32, progress=False)
    last = f"model.layers.{json.loads((FOLDER / 'config.json').read_text())['num_hidden_layers'] - 1}."
    weights = {k: v for k, v in load_file(FOLDER / "model.safetensors").items() if not k.startswith(last)}
    weights.update({k: v for k, v in load_file(q / "model.safetensors").items() if k.startswith(last)})
    out = tmp / "mixed"
    out.mkdir()
    for f in FOLDER.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "reference.npz"):
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((q / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**json.loads((FOLDER / "config.json").read_text()),
                                                 "quantization": config["quantization"]}))
    save_file(out / "model.safetensors", weights)
    model, _ = mlx_gemma.load(out)
    kinds = [isinstance(layer.mlp.down_proj, nn.QuantizedLinear) for layer in model.layers]
    assert kinds == [False] * (len(kinds) - 1) + [True]
    return out


@pytest.fixture(scope="module")
def guards(mixed_folder, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("guards")
    done = launch(str(SCRIPTS / "pipeline_guards.py"), str(out), str(FOLDER), str(mixed_folder))
    assert "exited with code" not in done.stderr and done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_rank_refuses_and_the_ranks_go_on_together(guards):
    for r, got in enumerate(guards):
        assert got["pipeline_share"] == ["pipeline", r, 2, False, False]
        assert got["contrastive"].startswith(f"DistributedError: rank {r}: contrastive search")
        assert got["score"].startswith(f"DistributedError: rank {r}: score()")
        assert got["save_pipeline_cache"].startswith("GenerationError: a distributed rank's prompt cache")
        assert got["whole_cache_on_rank"].startswith("PromptCacheError: a prompt cache made in one process")
        assert got["tokens_after_refusals_equal"]
        assert got["beams_equal"] and got["beams_logprob_err"] <= 1e-5, got  # beam search reads logits only


def test_ranks_holding_float_and_quantized_layers_feed_the_same_chunks(guards):
    assert [g["mixed_local_quantized"] for g in guards] == [False, True]  # the case the guard is for
    for got in guards:
        assert got["mixed_share_quantized"] is True
        assert got["mixed_prefill_step"] == [CPU_QUANTIZED_PREFILL_STEP_SIZE] * 2  # as the whole model's
        assert got["mixed_tokens_equal"] and got["mixed_err"] <= 1e-5, got


def test_tensor_parallel_caches_hold_the_rank_heads_and_never_pass_for_a_whole_model(guards):
    kv_heads = json.loads((FOLDER / "config.json").read_text())["num_key_value_heads"]
    for r, got in enumerate(guards):
        assert got["tensor_share"] == ["tensor", r, 2, False, True]
        assert got["tensor_cache_heads"] == [kv_heads // 2] * len(got["tensor_cache_heads"])
        # the fingerprint names the whole model's heads, and the rank's share beside them (docs/distributed.md)
        assert got["tensor_fingerprint"] == {"num_key_value_heads": kv_heads,
                                             "share": {"strategy": "tensor", "rank": r, "size": 2}}
        assert got["save_tensor_cache"].startswith("GenerationError: a distributed rank's prompt cache")


def launch_with_stdin(args: list[str], text: str, timeout: float = 900) -> tuple[str, str]:
    """(stdout, stderr) of `mlx.launch -n 2 --backend ring python ARGS` fed `text` on stdin.  The pipe
    stays open until the ranks exit: mlx.launch 0.32 copies its stdin to every rank and never passes an
    end of file on (it spins on one instead), so the input ends with /quit."""
    port = str(20_000 + (os.getpid() * 7 + time.monotonic_ns() // 1000) % 20_000)
    cmd = [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", port, sys.executable, *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True,
                             cwd=Path(__file__).parent.parent)
        try:
            p.stdin.write(text)
            p.stdin.flush()
            p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
            p.stdin.close()
        out.seek(0)
        err.seek(0)
        return out.read(), err.read()


@pytest.mark.parametrize("flag", ["--pipeline", "--tensor-parallel"])
def test_chat_cli_across_ranks_answers_as_one_process(flag):
    turns = ["Hello there", "And what else?"]
    stdout, stderr = launch_with_stdin(["-m", "mlx_gemma.chat", "--model", str(FOLDER), flag, "--max-tokens", "8"],
                                       "\n".join(turns) + "\n/quit\n")
    assert "exited with code" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    model, tokenizer = mlx_gemma.load(FOLDER)
    session = ChatSession(model, tokenizer, max_tokens=8)  # greedy, as the command line's default
    want = "".join(session.reply(turn) + "\n" for turn in turns)
    assert len(want) > 2 * len(turns)  # two replies with text in them
    assert stdout == want  # rank 0 alone prints: each reply once, the conversation's cache kept between turns
    assert stderr.count("[/reset starts a new conversation") == 1
