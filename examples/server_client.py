"""Ask the server about a picture with the official `openai` client, streaming the answer.

    python examples/server_client.py --model google/gemma-3-4b-it
    python examples/server_client.py --model google/gemma-3-4b-it --image photo.jpg --prompt "What is this?"
    python examples/server_client.py --url http://127.0.0.1:8080    # a server you started yourself

Without --url it starts `python -m mlx_gemma.server --model M --port 0` itself (loopback, a free
port) and stops it at the end.  The image goes in the request as a data URL (the server fetches
no remote URL); without --image it is a picture drawn here: a red disc on a blue sky over green
grass.  The answer streams to stdout; the token counts the server reports go to stderr.
"""

import argparse
import base64
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
from PIL import Image, ImageDraw


def picture() -> bytes:
    """A small PNG: a red disc (a sun) on a blue sky over green grass."""
    image = Image.new("RGB", (224, 224), (110, 170, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 150, 224, 224), fill=(60, 160, 70))
    draw.ellipse((140, 20, 200, 80), fill=(230, 40, 30))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(path: str | None) -> str:
    raw = Path(path).read_bytes() if path else picture()
    mime = "image/jpeg" if path and path.lower().endswith((".jpg", ".jpeg")) else "image/png"
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a server on a free loopback port, in a process group of its own."""
    proc = subprocess.Popen([sys.executable, "-m", "mlx_gemma.server", "--model", model, "--port", "0",
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:  # it prints "serving on http://HOST:PORT" once the model is loaded
        if line.startswith("serving on "):
            return proc, line.split()[-1]
    proc.wait()
    sys.exit(f"the server did not start (exit code {proc.returncode})")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def ask(url: str, image_url: str, prompt: str, max_tokens: int) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("MLX_GEMMA_API_KEY", "unused"))
    model = client.models.list().data[0].id  # the server names its model as it was given to --model
    stream = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0.0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                               {"type": "text", "text": prompt}]}])
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
        if chunk.usage is not None:  # the last chunk, asked for by include_usage
            usage = chunk.usage
    print(flush=True)
    if usage is not None:
        print(f"prompt tokens: {usage.prompt_tokens} (image included), completion tokens: {usage.completion_tokens}",
              file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Gemma 3 (4B-27B) or Gemma 4 folder or hub id, served for this run")
    p.add_argument("--url", help="a running server's base URL instead (then --model is not needed)")
    p.add_argument("--image", help="a PNG or JPEG file (default: a picture drawn here)")
    p.add_argument("--prompt", default="What is in this picture?")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    if not args.url and not args.model:
        p.error("give --model (to start a server) or --url (to use one)")
    if args.image and not Path(args.image).is_file():
        p.error(f"--image {args.image}: no such file")

    image_url = data_url(args.image)
    if args.url:
        ask(args.url.rstrip("/"), image_url, args.prompt, args.max_tokens)
        return
    proc, url = start_server(args.model)
    try:
        ask(url, image_url, args.prompt, args.max_tokens)
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
