"""Multi-turn chat: `ChatSession` for scripts, and the interactive `python -m mlx_gemma.chat`.

A session keeps the conversation as token ids (the replies exactly as
generated, never re-encoded from their text) and a `PromptCache` holding their
keys and values, so each turn prefills only its own new tokens.

    python -m mlx_gemma.chat --system "Answer briefly." --max-tokens 200
    >> Why is the sky blue?
    ...
    >> /reset      (a new conversation)   /quit or Ctrl-D (leave)

With a Gemma 3 vision-language model, `send(text, images=[...])` adds images to a turn (at
each `<start_of_image>` in the text, or first), and `/image PATH` at the prompt attaches one to
the next turn.  Earlier images stay in the prompt cache: the vision tower sees each image once.

With a Gemma 4 model (its `<|turn>` format), `--enable-thinking` / `ChatSession(enable_thinking=True)`
turns thinking on; earlier replies lose their thoughts as Gemma 4's template drops them.  A Gemma 4
model with towers takes images and (E2B / E4B) audio clips in any turn, `send(text, images=[...],
audio=[...])` or `/image PATH` and `/audio PATH` at the prompt: each at its `<|image|>` / `<|audio|>`
in the text, or, without markers, images then clips before the text (as Gemma 4's examples place
them); each image with its own number of soft tokens, as Gemma4Processor lays it out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

from .api import load
from .audio import load_audio
from .errors import AudioError, GenerationError, ImageError, MlxGemmaError, TokenizerError
from .cli import add_cache_flags, add_sampling_flags, console, error_line, kv_options_from, sampling_from
from .distributed.cli import add_distributed_flags, distributed_from, rank_console, running, shared_line
from .gemma4_prompts import AUDIO_MARKER, IMAGE_MARKER, blocks_of, media_settings, preprocess_media
from .gemma4_prompts import user_content as gemma4_content
from .generate import GenerationResponse, add_speculation_flags, format_stats, speculation_from, stream_generate
from .models.kv_cache import KVCacheOptions
from .samplers import SamplingSettings
from .image_chat import image_block, user_content
from .pan_and_scan import pan_and_scan_settings
from .prompt_cache import PromptCache
from .proposers import Speculation
from .vision import image_segments, load_image, with_crops


def next_turn_ids(tokenizer, history: list[int], text, system: str | None = None,
                  image_block: list | None = None, enable_thinking: bool = False,
                  reply_start: int | None = None, audio_block: list | None = None) -> list[int]:
    """The conversation's ids with a new user turn `text` and the model's turn opened.

    `history` is the ids so far (empty for the first turn, where `system` goes),
    ending with the last reply; a reply that did not end with <end_of_turn>
    (cut short, or ended by <eos>) is closed with one, as Gemma's template
    closes every model turn.  `text` may be a list of content parts (`{"type": "image"}`
    among them, laid out as `image_block`: `mlx_gemma.image_chat.image_block`; Gemma 4: a list with
    each image's block, and `audio_block` likewise for `{"type": "audio"}` parts).

    Gemma 4 (`chat_format == "gemma4"`): `enable_thinking` puts `<|think|>` in the first turn's
    system turn; the last reply (from `reply_start`, by default just after the last
    `<|turn>model\\n` of `history`) loses its thought blocks and the whitespace at its ends, as the
    template renders an earlier reply (`last_reply_as_rendered`).
    """
    gemma4 = tokenizer.chat_format == "gemma4"
    if not history:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        thinking = {"enable_thinking": True} if enable_thinking else {}  # Gemma 1-3 refuse it (typed)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             image_block=image_block, audio_block=audio_block, **thinking)
    eot = tokenizer.end_of_turn_id
    if history[-1] != eot and history[-1] in tokenizer.eos_token_ids:
        history = history[:-1]  # another stop id (<eos>) ends the reply: the template has <end_of_turn> there
    if gemma4:
        history = last_reply_as_rendered(tokenizer, history, reply_start)
    closing = [] if history and history[-1] == eot else [eot]
    # Gemma 4: the system turn (with <|think|>) was rendered in the first turn; the generation prompt
    # closes an empty thought channel on 26B / 31B unless thinking is on (chat_template.py).
    later = {"empty_thought": tokenizer.empty_thought and not enable_thinking} if gemma4 else {}
    turn = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                         image_block=image_block, audio_block=audio_block, **later)[1:]  # no <bos>
    return history + closing + tokenizer.encode("\n", add_bos=False) + turn


def reply_start_of(tokenizer, ids: list[int]) -> int:
    """Where the reply begins after a Gemma 4 prompt `ids`: after its last `<|turn>` and "model\\n"
    (a generation prompt's empty thought channel, 26B / 31B, counts as part of the reply)."""
    turn = tokenizer.start_of_turn_id
    last = max((i for i, t in enumerate(ids) if t == turn), default=None)
    if last is None:
        raise GenerationError("the conversation's ids hold no <|turn>: no model turn to find")
    return last + 1 + len(tokenizer.encode("model\n", add_bos=False))


def last_reply_as_rendered(tokenizer, history: list[int], reply_start: int | None = None) -> list[int]:
    """`history` with its last reply (`history[reply_start:]`) as Gemma 4's template renders a reply
    once a user turn follows: its `<|channel>...<channel|>` thought blocks dropped (an unclosed
    one to the end, a stray `<channel|>` with it: the template's strip_thinking) and whitespace
    tokens at both ends dropped (its `| trim`).  The other ids are kept as they are."""
    start = reply_start_of(tokenizer, history) if reply_start is None else reply_start
    reply, eot = history[start:], tokenizer.end_of_turn_id
    closed = bool(reply) and reply[-1] == eot
    channel, end = tokenizer.piece_to_id("<|channel>"), tokenizer.piece_to_id("<channel|>")
    kept, inside = [], False
    for t in reply[:-1] if closed else reply:
        if t == end:
            inside = False
        elif t == channel:
            inside = True
        elif not inside:
            kept.append(t)
    text = [i for i, t in enumerate(kept) if not _is_blank(tokenizer, t)]
    kept = kept[text[0]:text[-1] + 1] if text else []
    return history[:start] + kept + ([eot] if closed else [])


def _is_blank(tokenizer, token: int) -> bool:
    """Whether a token's text is whitespace only (what `trim` removes at a reply's ends)."""
    if token in tokenizer.special_ids or not 0 <= token < tokenizer.vocab_size:  # an embedding row past the vocabulary
        return False
    return tokenizer.id_to_piece(token).replace("\u2581", " ").isspace()


class ChatSession:
    """A conversation with a model: `send(text)` streams the reply as `GenerationResponse`s.

    Generation settings (`max_tokens`, `sampler`, `logits_processors` or one
    `sampling=SamplingSettings(...)`, ... any `stream_generate` argument) are given once;
    `kv_options` (a `KVCacheOptions`, or its
    fields as keywords: max_kv_size, kv_bits, ...) shape the session's cache.
    Replies stop at <end_of_turn> and the model's own stop ids.  `pan_and_scan` (Gemma 3: True
    or a `PanAndScan`) gives each image's crops too; they are cut once, when the image is sent,
    and stay in the history (and the cache) with it.

    Gemma 4: `enable_thinking` turns its thinking mode on (`<|think|>` in the system turn).  A reply
    enters the history as generated, thoughts included; when the next turn comes, its thought
    blocks (and a 26B / 31B generation prompt's empty one) are dropped as the template drops them
    (`last_reply_as_rendered`), and the prompt cache trims back to where the reply changed and
    refills from there, so each turn's ids are the whole conversation as the template renders it.
    With its towers, `send(text, images=..., audio=...)` adds images and clips to any turn (see the
    module's text); each is read once, when sent, and stays in the history and the cache with its turn.
    Media the model has no tower for raise ImageError / AudioError, and the session stays as it was.

    Speculative decoding (exact; see `stream_generate`): `draft_model` (a model with this vocabulary
    or `load`'s pair) or `prompt_lookup=N`, up to `num_draft_tokens` proposals per step.  The session's cache keeps the windows' slack and the draft's
    own caches from turn to turn (`PromptCache.paired_draft`); each response counts `draft_accepted` /
    `draft_proposed` for its turn.
    """

    def __init__(self, model, tokenizer, system: str | None = None, max_tokens: int = 256, sampler=None,
                 logits_processors=None, kv_options: KVCacheOptions | None = None, max_kv_size=None, kv_bits=None,
                 kv_group_size=None, quantized_kv_start=None, sampling: SamplingSettings | None = None,
                 enable_thinking: bool = False, draft_model=None, num_draft_tokens: int | None = None,
                 prompt_lookup: int | None = None, **generate_kwargs):
        if tokenizer.start_of_turn_id is None or tokenizer.end_of_turn_id is None:
            raise TokenizerError(tokenizer.path, "vocabulary has no <start_of_turn>/<end_of_turn>: not a chat model")
        if enable_thinking and tokenizer.chat_format != "gemma4":
            raise GenerationError("enable_thinking: Gemma 1-3 have no thinking mode (Gemma 4 has)")
        kv = dict(max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size,
                  quantized_kv_start=quantized_kv_start)
        if sampling is not None:
            if sampler is not None or logits_processors is not None:
                raise GenerationError("give a SamplingSettings or a sampler and logits processors, not both")
            # Made once: a seeded sampler keeps drawing from one key across the turns.
            sampler, logits_processors = sampling.sampler(), sampling.processors()
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.enable_thinking = bool(enable_thinking)
        # Crops are cut here, per turn; stream_generate gets them as images of token-id prompts.
        self.pan_and_scan = pan_and_scan_settings(generate_kwargs.pop("pan_and_scan", None))
        if self.pan_and_scan and tokenizer.chat_format == "gemma4":
            raise GenerationError("pan & scan is Gemma 3's (its processor's); Gemma 4 sizes each image itself")
        speculation = Speculation.of(draft_model, num_draft_tokens, prompt_lookup)  # a draft loaded once
        self.cache = PromptCache(model, kv_options, slack=speculation.num_draft_tokens if speculation else 0,
                                 **{k: v for k, v in kv.items() if v is not None})
        self.settings = dict(max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                             **generate_kwargs)
        if speculation is not None:
            self.settings.update(draft_model=speculation.draft_model, prompt_lookup=speculation.prompt_lookup,
                                 num_draft_tokens=speculation.num_draft_tokens)
        self.settings["stop_token_ids"] = [tokenizer.end_of_turn_id, *(generate_kwargs.get("stop_token_ids") or [])]
        self.history: list[int] = []  # the conversation's ids, replies included
        self.images: list = []  # the conversation's images (RGB PIL images, crops after theirs), in order
        self.clips: list = []  # Gemma 4: the conversation's audio clips (samples at the extractor's rate), in order
        self.reply_start: int | None = None  # Gemma 4: where the last reply begins in `history`

    def reset(self) -> None:
        """Start a new conversation (same system prompt and settings)."""
        self.history, self.images, self.clips, self.reply_start = [], [], [], None
        self.cache.reset()

    def send(self, text: str, images=None, audio=None) -> Iterator[GenerationResponse]:
        """Add a user turn (with `images`: paths, PIL images or arrays, at each `<start_of_image>`
        in `text` or first; Gemma 4: at each `<|image|>`, and `audio`: paths, file bytes or 16 kHz
        samples, at each `<|audio|>`) and stream the model's reply (recorded in `history` as it comes)."""
        images, clips = _as_list(images), _as_list(audio)
        turn = self._gemma4_turn if self.tokenizer.chat_format == "gemma4" else self._gemma3_turn
        ids, new_images, new_clips = turn(text, images, clips)  # typed errors here leave the session as it was
        every, sounds = self.images + new_images, self.clips + new_clips
        responses = stream_generate(self.model, self.tokenizer, ids, prompt_cache=self.cache,
                                    image=every or None, audio=sounds or None, **self.settings)
        generated: list[int] = []
        try:
            for r in responses:
                generated.append(r.token)
                yield r
        finally:
            responses.close()  # so the cache records its tokens now, not whenever collected
            self.history, self.images, self.clips = ids + generated, every, sounds
            if self.tokenizer.chat_format == "gemma4":
                self.reply_start = reply_start_of(self.tokenizer, ids)

    def reply(self, text: str, images=None, audio=None) -> str:
        """`send`, returning the reply's text."""
        return "".join(r.text for r in self.send(text, images, audio))

    def _gemma3_turn(self, text: str, images: list, clips: list) -> tuple[list[int], list, list]:
        """(the conversation's ids with a Gemma 1-3 user turn, its images read (crops after each), no clips)."""
        spec = self.model.image_input
        if clips:
            raise AudioError("audio", f"this {self.model.model_type} model takes no audio (Gemma 4 E2B / E4B do)")
        if images and (spec is None or spec.start_id is None):
            raise GenerationError("this model takes no images in a chat (Gemma 3 vision-language models do)")
        new = [load_image(im, f"images[{i}]") for i, im in enumerate(images)]  # read once, kept as read
        flat, n_crops = with_crops(new, self.pan_and_scan)  # each image, then its crops
        block = image_block(spec) if spec is not None and spec.start_id is not None else None
        if any(n_crops):
            block = [image_segments(spec, n) for n in n_crops]
        content = user_content(text, len(new), self.tokenizer.id_to_piece(spec.start_id)) if new else text
        ids = next_turn_ids(self.tokenizer, self.history, content, self.system, block, self.enable_thinking,
                            self.reply_start)
        return ids, flat, []

    def _gemma4_turn(self, text: str, images: list, clips: list) -> tuple[list[int], list, list]:
        """(the conversation's ids with a Gemma 4 user turn, its images read, its clips read): each image
        and clip read once, its block as long as Gemma4Processor makes it (`gemma4_prompts.blocks_of`)."""
        model = self.model
        if images and (model.image_input is None or not model.image_input.variable):
            raise ImageError("images", f"this {model.model_type} model has no vision tower: it takes no images")
        if clips and model.audio_input is None:
            raise AudioError("audio", f"this {model.model_type} model has no audio tower: it takes no audio")
        new = [load_image(im, f"images[{i}]") for i, im in enumerate(images)]
        rate = media_settings(model)[1].sampling_rate if clips else None
        sounds = [load_audio(c, rate, name=f"audio[{i}]") for i, c in enumerate(clips)]
        content = text
        if new or sounds:
            image_blocks, audio_blocks = blocks_of(model, preprocess_media(model, new, sounds))
            content = gemma4_content(marked_text(text, len(new), len(sounds)))
        else:
            image_blocks = audio_blocks = None  # no media: the text is plain text, markers and all
        ids = next_turn_ids(self.tokenizer, self.history, content, self.system, image_blocks or None,
                            self.enable_thinking, self.reply_start, audio_blocks or None)
        return ids, new, sounds


def marked_text(text: str, n_images: int, n_clips: int) -> str:
    """Gemma 4: `text` with one `<|image|>` per image and one `<|audio|>` per clip: as written, or,
    without markers, the images' and then the clips' markers first (the chat template then renders
    them before the text, where Gemma 4's examples put media).  Other counts are typed errors."""
    if IMAGE_MARKER not in text and AUDIO_MARKER not in text:
        return IMAGE_MARKER * n_images + AUDIO_MARKER * n_clips + text
    for marker, n, error, kind in ((IMAGE_MARKER, n_images, ImageError, "images"),
                                   (AUDIO_MARKER, n_clips, AudioError, "audio")):
        if text.count(marker) != n:
            raise error(kind, f"the message holds {text.count(marker)} {marker} markers for {n} {kind} "
                              "input(s); give one per marker (or no markers)")
    return text


def _as_list(items) -> list:
    return [] if items is None else list(items) if isinstance(items, (list, tuple)) else [items]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma.chat",
                                description="Chat with a Gemma instruct model (/reset: new conversation; "
                                            "/image PATH: attach an image to your next message, Gemma 3 "
                                            "vision-language models and Gemma 4; /audio PATH: attach an audio "
                                            "clip (WAV, FLAC, OGG), Gemma 4 E2B / E4B; the next message may place "
                                            "them with <start_of_image> (Gemma 3) or <|image|> / <|audio|> (Gemma 4), "
                                            "else they come first; /quit: leave).")
    p.add_argument("--model", default=None, help="model folder or hub repo id (default: the packaged model)")
    p.add_argument("--system", "--system-prompt", dest="system", help="system prompt for every conversation")
    add_sampling_flags(p)
    add_cache_flags(p)
    add_speculation_flags(p)
    p.add_argument("--pan-and-scan", action="store_true",
                   help="Gemma 3: also give the model crops of wide or tall images (transformers' do_pan_and_scan)")
    p.add_argument("--enable-thinking", action="store_true",
                   help="Gemma 4: turn its thinking mode on (replies may open with a thought, dropped from later turns)")
    p.add_argument("--verbose", action="store_true",
                   help="print each reply's statistics to stderr (with speculation: proposed tokens accepted)")
    add_distributed_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, err = console()
    interactive = sys.stdin.isatty()
    try:
        sampling = sampling_from(args)
        ranks = distributed_from(args)  # --pipeline / --tensor-parallel: rank 0 reads, every rank answers
        model, tokenizer = load(args.model, **ranks)
        out, err = rank_console(ranks, out, err)
        session = ChatSession(model, tokenizer, args.system, args.max_tokens, sampling=sampling,
                              kv_options=kv_options_from(args), pan_and_scan=args.pan_and_scan or None,
                              enable_thinking=args.enable_thinking, **speculation_from(args))
        print("[/reset starts a new conversation; /image PATH attaches an image, /audio PATH a clip; "
              "/quit or Ctrl-D leaves]", file=err)
        pending: dict = {"image": [], "audio": []}  # media attached to the next message
        while True:
            line = shared_line(ranks, lambda: _read_line(interactive))
            if not line:  # EOF
                break
            text = line.strip()
            if text == "/quit":
                break
            if text == "/reset":
                session.reset()
                pending = {"image": [], "audio": []}
                print("[new conversation]", file=err)
                continue
            kind = next((k for k in pending if text.startswith(f"/{k} ")), None)
            if kind is not None:
                attached = _attach(kind, text[len(kind) + 2:].strip(), err)
                pending[kind] += [] if attached is None else [attached]
                continue
            if not text:
                continue
            last = None
            try:
                media, pending = pending, {"image": [], "audio": []}
                with running(ranks, "answering"):
                    for last in session.send(text, media["image"], media["audio"]):
                        print(last.text, end="", file=out, flush=True)
            except (ImageError, AudioError) as e:  # media the model cannot take: the conversation is as it was
                print(f"{error_line(e)} (message not sent)", file=err)
                continue
            except GenerationError as e:  # e.g. the conversation outgrew the context: say so, go on
                print(f"{error_line(e)} (/reset starts a new conversation)", file=err)
                continue
            print(file=out, flush=True)
            if args.verbose and last is not None:
                print(format_stats(last), file=err)
            elif last is not None and last.draft_proposed is not None:  # speculating: say what it kept
                print(f"[speculation: {last.draft_accepted}/{last.draft_proposed} proposed tokens accepted]", file=err)
        return 0
    except EOFError:  # Ctrl-D at an interactive prompt
        print(file=out)
        return 0
    except KeyboardInterrupt:
        print(file=out, flush=True)
        return 0
    except MlxGemmaError as e:
        print(error_line(e), file=err)
        return 2


def _read_line(interactive: bool) -> str:
    """The next line of input ("" at its end: Ctrl-D at a prompt, as an empty line there, leaves)."""
    if not interactive:
        return sys.stdin.readline()
    try:
        return input(">> ")
    except EOFError:
        return ""


def _attach(kind: str, path: str, err):
    """`/image PATH` or `/audio PATH`: the image or clip (its samples at 16 kHz) read now (said so on
    stderr), or None with the reason."""
    try:
        item = load_image(path) if kind == "image" else load_audio(path)
    except MlxGemmaError as e:
        print(f"{error_line(e)} (not attached)", file=err)
        return None
    print(f"[{'image' if kind == 'image' else 'audio clip'} {path} attached to your next message]", file=err)
    return item


if __name__ == "__main__":
    sys.exit(main())
