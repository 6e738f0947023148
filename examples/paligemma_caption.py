"""Caption images (or answer a question about them) with PaliGemma 1 or 2.

    python examples/paligemma_caption.py --model google/paligemma2-3b-mix-224 photo.jpg
    python examples/paligemma_caption.py --model paligemma-4bit --prompt "answer en what color is the car?" a.jpg b.png

Prompts are the model card's task prompts: "caption en", "describe en", "ocr",
"answer en <question>", "question en <answer>".  Several images go through in
one batch, one answer each; decoding is greedy.  Convert a checkpoint once with
`python convert.py --hf-path google/paligemma2-3b-mix-224 --mlx-path paligemma-4bit -q`.
"""

import argparse

import mlx_gemma
from mlx_gemma.generate import batch_generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", required=True, help="a PaliGemma folder or hub repo id")
    p.add_argument("--prompt", default="caption en", help="the task prompt (default: caption en)")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    model, tokenizer = mlx_gemma.load(args.model)
    answers = batch_generate(model, tokenizer, [args.prompt] * len(args.images), max_tokens=args.max_tokens,
                             image=args.images, skip_special_tokens=True)
    for path, answer in zip(args.images, answers):
        print(f"{path}: {answer.strip()}")


if __name__ == "__main__":
    main()
