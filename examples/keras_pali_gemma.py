"""The keras-hub `PaliGemmaCausalLM` calls, on MLX.

    python examples/keras_pali_gemma.py                                   # pali_gemma_3b_mix_224 (downloads 3B)
    python examples/keras_pali_gemma.py --model pali_gemma2_mix_3b_224 --image cow.jpg
    python examples/keras_pali_gemma.py --model hf://google/paligemma-3b-mix-448

--model takes what `PaliGemmaCausalLM.from_preset` takes: a keras-hub preset name,
hf:// or kaggle:// handle, or a folder (MLX, Hugging Face or keras-hub preset).
Without --image, the image is keras-hub's example's `np.random.rand(size, size, 3)`.
keras-hub's `max_length` counts the prompt's text tokens: here the prompt plus --max-tokens.
"""

import argparse

import numpy as np

from mlx_gemma import PaliGemmaCausalLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pali_gemma_3b_mix_224", help="preset name, hf:// / kaggle:// handle or folder")
    p.add_argument("--image", default=None, help="an image file (default: random pixels)")
    p.add_argument("--max-tokens", type=int, default=20)
    args = p.parse_args()

    pali_gemma_lm = PaliGemmaCausalLM.from_preset(args.model)
    size = pali_gemma_lm.backbone.image_size
    image = args.image or np.random.default_rng(0).random((size, size, 3))
    tokenizer = pali_gemma_lm.preprocessor.tokenizer

    def max_length(*prompts):  # room for --max-tokens new tokens after the longest prompt (and <bos>)
        return 1 + max(len(tokenizer(p)) for p in prompts) + args.max_tokens

    print("== one image, one prompt")
    question = "answer en where is the cow standing?\n"
    print(repr(pali_gemma_lm.generate({"images": image, "prompts": question}, max_length=max_length(question))))

    print("== batched prompts, strip_prompt=True")
    prompts = ["answer en where is the cow standing?\n", "caption en\n"]
    print(pali_gemma_lm.generate({"images": [image, image], "prompts": prompts}, max_length=max_length(*prompts),
                                 strip_prompt=True))

    print("== generate() without preprocessing: pixels and token ids in, token ids out")
    packed = pali_gemma_lm.preprocessor.generate_preprocess({"images": [image, image], "prompts": prompts},
                                                            sequence_length=max_length(*prompts))
    preprocessor, pali_gemma_lm.preprocessor = pali_gemma_lm.preprocessor, None
    out = pali_gemma_lm.generate(packed, stop_token_ids=None)
    print(out["token_ids"], out["padding_mask"].astype(int), sep="\n")
    pali_gemma_lm.preprocessor = preprocessor


if __name__ == "__main__":
    main()
