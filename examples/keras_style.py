"""The keras-hub `GemmaCausalLM` calls, on MLX.

    python examples/keras_style.py                       # the packaged Gemma 3 270M
    python examples/keras_style.py --model gemma2_instruct_2b_en   # a keras-hub preset name
    python examples/keras_style.py --model hf://google/gemma-2-2b-it

--model takes what `GemmaCausalLM.from_preset` takes: a keras-hub preset name,
hf:// or kaggle:// handle, or a folder (MLX, Hugging Face or keras-hub preset).
keras-hub's `max_length` counts the prompt: here it is the prompt plus --max-tokens.
"""

import argparse

import mlx.core as mx

from mlx_gemma import GemmaBackbone, GemmaCausalLM, GemmaCausalLMPreprocessor
from mlx_gemma.tasks import BeamSampler, TopKSampler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="preset name, hf:// / kaggle:// handle or folder "
                                                 "(default: the packaged model)")
    p.add_argument("--max-tokens", type=int, default=30)
    args = p.parse_args()
    if args.model is None:
        from mlx_gemma.default_model import default_model_path

        args.model = str(default_model_path())

    gemma_lm = GemmaCausalLM.from_preset(args.model)
    tokenizer = gemma_lm.preprocessor.tokenizer

    def max_length(*prompts):  # room for --max-tokens new tokens after the longest prompt (and <bos>)
        return 1 + max(len(tokenizer(p)) for p in prompts) + args.max_tokens

    print("== greedy (GemmaCausalLM's default)")
    print(repr(gemma_lm.generate("I want to say", max_length=max_length("I want to say"))))
    prompts = ["This is a", "Where are you"]
    print(gemma_lm.generate(prompts, max_length=max_length(*prompts)))

    print("== compile(sampler='top_k'), then a seeded TopKSampler")
    gemma_lm.compile(sampler="top_k")
    print(repr(gemma_lm.generate("I want to say", max_length=max_length("I want to say"))))
    gemma_lm.compile(sampler=TopKSampler(k=5, seed=2, temperature=0.7))
    print(repr(gemma_lm.generate("I want to say", max_length=max_length("I want to say"))))

    print("== compile(sampler=BeamSampler(num_beams=2)), strip_prompt=True")
    gemma_lm.compile(sampler=BeamSampler(num_beams=2))
    print(repr(gemma_lm.generate("I want to say", max_length=max_length("I want to say"), strip_prompt=True)))

    print("== generate() without preprocessing: token ids in, token ids out")
    gemma_lm.compile(sampler="greedy")
    packed = gemma_lm.preprocessor.generate_preprocess(["I want to say"] * 2,
                                                       sequence_length=max_length("I want to say"))
    preprocessor, gemma_lm.preprocessor = gemma_lm.preprocessor, None
    out = gemma_lm.generate(packed, stop_token_ids=None)
    print(out["token_ids"], out["padding_mask"].astype(int), sep="\n")
    gemma_lm.preprocessor = preprocessor

    print("== a custom backbone and preprocessor (random weights: the text is noise)")
    mx.random.seed(0)  # the backbone's initial weights
    custom = GemmaCausalLM(
        backbone=GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_heads=4,
                               hidden_dim=64, intermediate_dim=128, max_sequence_length=128),
        preprocessor=GemmaCausalLMPreprocessor(tokenizer=tokenizer, sequence_length=16),
    )
    print(repr(custom.generate("I want to say", stop_token_ids=None)))


if __name__ == "__main__":
    main()
