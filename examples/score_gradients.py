"""keras-hub's `score` example (gradients of the per-token losses with respect to
the embeddings, done there with a TensorFlow GradientTape), in MLX with `mx.grad`.

    python examples/score_gradients.py                   # the packaged Gemma 3 270M
    python examples/score_gradients.py --model path/to/folder

Prints each token's loss and the size of the gradient at its embedding: how
much nudging that token's embedding would change the total loss (a simple
saliency map).
"""

import argparse

import mlx.core as mx
import numpy as np

import mlx_gemma
from mlx_gemma.score import score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or hub id (default: the packaged model)")
    p.add_argument("--max-tokens", type=int, default=0, help="unused (the examples share their flags)")
    args = p.parse_args()
    model, tokenizer = mlx_gemma.load(args.model)

    texts = ["This is a test of scoring", "Where are you"]
    rows = [tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tokenizer.pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, True
    token_ids, padding_mask = mx.array(ids), mx.array(mask)
    target_ids = mx.roll(token_ids, -1, axis=1)  # each position predicts the next token
    # The last real token of a row has no next token: leave it out of the total.
    has_next = mx.concatenate([padding_mask[:, 1:], mx.zeros((len(rows), 1), dtype=mx.bool_)], axis=1)
    counted = padding_mask & has_next

    def total_loss(delta):  # delta [B, T, hidden] added to the token embeddings
        intercept = lambda x, i: x + delta if i == -1 else x  # noqa: E731
        losses = score(model, token_ids, padding_mask, scoring_mode="loss", layer_intercept_fn=intercept,
                       target_ids=target_ids)
        return (losses * counted).sum(), losses

    zeros = mx.zeros((*token_ids.shape, model.args.hidden_size))
    (total, losses), grads = mx.value_and_grad(total_loss)(zeros)
    saliency = mx.linalg.norm(grads, axis=-1)  # [B, T]
    print(f"== total loss {total.item():.4f}")
    for b, row in enumerate(rows):
        print(f"== {texts[b]!r}")
        for t, token in enumerate(row):
            piece = tokenizer.id_to_piece(token)
            print(f"{piece!r:>14}  loss {losses[b, t].item():8.4f}  |d total / d embedding| {saliency[b, t].item():.4g}")


if __name__ == "__main__":
    main()
