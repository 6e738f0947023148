"""Detect objects with PaliGemma and save the picture with the boxes drawn on it.

    python examples/paligemma_detect.py --model google/paligemma2-3b-mix-224 street.jpg "car ; person" -o boxes.png

The prompt is "detect car ; person"; the model answers with four `<locYYYY>`
tokens (y_min, x_min, y_max, x_max on a 1024-bin grid) and a label per object,
which `mlx_gemma.vision.parse_detections` turns into pixel boxes in the original
image and `draw_detections` draws.
"""

import argparse

import mlx_gemma
from mlx_gemma.generate import generate
from mlx_gemma.vision import draw_detections, load_image, parse_detections


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image", help="image file")
    p.add_argument("objects", help='what to find, separated by " ; " (e.g. "cat ; dog")')
    p.add_argument("--model", required=True, help="a PaliGemma folder or hub repo id")
    p.add_argument("-o", "--output", default="detections.png", help="where to write the annotated PNG")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()

    model, tokenizer = mlx_gemma.load(args.model)
    image = load_image(args.image)  # EXIF orientation applied: boxes refer to the picture as seen
    text = generate(model, tokenizer, f"detect {args.objects}", image=image, max_tokens=args.max_tokens)
    detections = parse_detections(text, image.size)
    for d in detections:
        print(f"{d.label or '?'}: x {d.box[0]:.0f}-{d.box[2]:.0f}, y {d.box[1]:.0f}-{d.box[3]:.0f}")
    if not detections:
        print(f"no boxes in the answer: {text!r}")
    draw_detections(image, detections, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
