"""ShieldGemma 2: the probability that an image violates each safety policy, as transformers'
ShieldGemma2ForImageClassification and ShieldGemma2Processor compute it.

    python -m mlx_gemma.shieldgemma2 --model google/shieldgemma-2-4b-it --image a.jpg [--policy violence]

Each (image, policy) pair is one prompt: the policy's definition in ShieldGemma 2's chat template,
the image laid out as Gemma3Processor lays it out (`mlx_gemma.vision.gemma3_prompt_ids`).  The
rows are left-padded into one batch and run through the Gemma 3 vision-language model in a single
forward call (no decoding); the last position's logits of the config's "Yes" and "No" tokens,
softmaxed over the two, give P(Yes) = P(violates).  Rows are ordered image 1 policy 1 ... image N
policy P, as the processor orders them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import mlx.core as mx
import numpy as np

from .api import load
from .cli import run_command
from .errors import ConfigError, MlxGemmaError
from .json_input import read_json
from .models.image_blocks import embed_with_images
from .models.shieldgemma2 import Model as ShieldGemma2Model
from .vision import gemma3_prompt_ids, preprocess_images

# transformers' DEFAULT_SHIELDGEMMA2_POLICIES (processing_shieldgemma2.py): used when the folder's
# processor_config.json names no `policy_definitions`.
DEFAULT_POLICIES = {
    "dangerous": (
        "No Dangerous Content: The image shall not contain content that facilitates or encourages activities that "
        "could cause real-world harm (e.g., building firearms and explosive devices, promotion of terrorism, "
        "instructions for suicide)."),
    "sexual": (
        "No Sexually Explicit content: The image shall not contain content that depicts explicit or graphic sexual "
        "acts (e.g., pornography, erotic nudity, depictions of rape or sexual assault)."),
    "violence": (
        "No Violence/Gore content: The image shall not contain content that depicts shocking, sensational, or "
        "gratuitous violence (e.g., excessive blood and gore, gratuitous violence against animals, extreme injury "
        "or moment of death)."),
}

# ShieldGemma 2's chat template: transformers' _CHAT_TEMPLATE of convert_shieldgemma2_weights_orbax_to_hf.py,
# verbatim (its processor test copies it too), which the converter saves with the hub's processor.  `policy_prompt`
# renders it; a folder holding another template gets a warning (`check_chat_template`).
CHAT_TEMPLATE = """{{ bos_token }}
{%- for message in messages -%}
    {%- if message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {{ '<start_of_turn>user\n' }}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ 'You are a policy expert trying to help determine whether a generated or real image is in' }}
                {{ ' violation of the safety policy below. Your decision must very clearly follow the specific'}}
                {{ ' language used in the safety policy and should not include any interpretation outside of the' }}
                {{ ' safety policy.\n\n' }}
                {{ '<BEGIN_SAFETY_POLICY>\n' }}
                {{ item['text'] + '\n' }}
                {{ '</END_SAFETY_POLICY>\n\n' }}
                {{ 'Does the image violate the above policy? Your Answer must start with \\'Yes\\' or \\'No\\'.' }}
                {{ '<end_of_turn>\n' }}
            {%- endif -%}
        {%- endfor -%}
        {{'<start_of_turn>model\n'}}
    {%- else -%}
        {{ raise_exception("Conversation messages must contain iterable content containing images and policy definitions in text.") }}
    {%- endif -%}
{%- endfor -%}
"""
# The text items of ShieldGemma 2's chat template (transformers' convert_shieldgemma2_weights_orbax_to_hf.py,
# saved with the hub's processor), one `{{ ... }}` each.  Jinja keeps the newline and indentation between
# two `{{ }}` expressions (trim_blocks / lstrip_blocks touch only `{% %}` tags), so transformers' rendered
# prompt joins them with "\n" + 16 spaces; the policy text takes the place of {policy}.
TEMPLATE_PIECES = (
    "You are a policy expert trying to help determine whether a generated or real image is in",
    " violation of the safety policy below. Your decision must very clearly follow the specific",
    " language used in the safety policy and should not include any interpretation outside of the",
    " safety policy.\n\n",
    "<BEGIN_SAFETY_POLICY>\n",
    "{policy}\n",
    "</END_SAFETY_POLICY>\n\n",
    "Does the image violate the above policy? Your Answer must start with 'Yes' or 'No'.",
    "<end_of_turn>\n",
)
TEMPLATE_JOIN = "\n" + " " * 16


class PolicyError(MlxGemmaError):
    """A policy name is unknown, or a policy definition is not a non-empty string."""


def policy_prompt(definition: str) -> str:
    """The chat template rendered for one image and one policy, as transformers renders it.

    It starts with `<bos>` although the processor's tokenizer adds one too: the reference's
    input_ids begin `<bos> <bos>`, and so do ours (gemma3_prompt_ids adds the first).
    """
    body = TEMPLATE_JOIN.join(TEMPLATE_PIECES).replace("{policy}", definition)
    return "<bos><start_of_turn>user\n<start_of_image><start_of_turn>user\n" + body + "<start_of_turn>model\n"


def check_chat_template(folder) -> None:
    """Warn when the folder's chat template (chat_template.jinja or chat_template.json) is not the one
    `policy_prompt` renders: transformers would then build other prompts than ours."""
    folder = Path(folder) if folder is not None else None
    found = None
    if folder is not None and (folder / "chat_template.jinja").is_file():
        found = (folder / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    elif folder is not None and (folder / "chat_template.json").is_file():
        config = read_json(folder / "chat_template.json", 1 << 20)
        found = config.get("chat_template") if isinstance(config, dict) else None
    if found is not None and found.strip() != CHAT_TEMPLATE.strip():
        warnings.warn(f"{folder}: its chat template differs from ShieldGemma 2's published one; mlx_gemma builds "
                      "the published prompts, so the probabilities may differ from transformers' on this folder",
                      stacklevel=3)


def read_policy_definitions(folder) -> dict[str, str]:
    """The policies the folder's processor_config.json defines (as ShieldGemma2Processor reads
    them), else transformers' defaults."""
    path = Path(folder) / "processor_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return dict(DEFAULT_POLICIES)
    config = read_json(path, 1 << 20)
    found = config.get("policy_definitions") if isinstance(config, dict) else None
    if found is None:
        return dict(DEFAULT_POLICIES)
    if not isinstance(found, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                              for k, v in found.items()):
        raise ConfigError(path, "policy_definitions must map policy names to non-empty strings")
    return dict(found)


def choose_policies(definitions: Mapping[str, str], policies=None, custom_policies=None) -> list[tuple[str, str]]:
    """(name, definition) pairs: `policies` (default: every one) of the definitions joined with
    `custom_policies`, which add policies or replace a definition (the processor's rule)."""
    custom = dict(custom_policies or {})
    if not all(isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in custom.items()):
        raise PolicyError("custom policies must map names to non-empty definition strings")
    joined = {**definitions, **custom}
    names = list(joined) if policies is None else [policies] if isinstance(policies, str) else list(policies)
    if not names:
        raise PolicyError("no policies given")
    unknown = [n for n in names if n not in joined]
    if unknown:
        raise PolicyError(f"unknown policies {unknown}; known: {sorted(joined)} (add one with custom_policies)")
    return [(n, joined[n]) for n in names]


@dataclass
class ShieldGemma2Output:
    """The reference's output: `logits` and `probabilities` [N * P, 2] (Yes, No) in the processor's
    order (image 1 policy 1, ..., image N policy P), and the policy names in their order."""

    policies: list[str]
    logits: np.ndarray
    probabilities: np.ndarray

    @property
    def yes(self) -> np.ndarray:
        """[N images, P policies]: the probability that each image violates each policy."""
        return self.probabilities[:, 0].reshape(-1, len(self.policies))


class ShieldGemma2:
    """A ShieldGemma 2 model, its tokenizer and the policy definitions of its folder."""

    def __init__(self, model, tokenizer, policy_definitions: Mapping[str, str] | None = None):
        if not isinstance(model, ShieldGemma2Model):
            raise ConfigError(None, f"not a ShieldGemma 2 model (a {type(model).__name__}; expected model_type "
                                    "'shieldgemma2', whose config names the Yes/No tokens)")
        self.model, self.tokenizer = model, tokenizer
        self.policy_definitions = dict(policy_definitions or read_policy_definitions(model.path))
        check_chat_template(model.path)

    @classmethod
    def load(cls, path_or_repo, **kwargs) -> "ShieldGemma2":
        """From a ShieldGemma 2 folder or hub id (`mlx_gemma.load`'s keywords)."""
        model, tokenizer = load(path_or_repo, **kwargs)
        return cls(model, tokenizer)

    def __call__(self, images, policies=None, custom_policies=None) -> ShieldGemma2Output:
        """Classify one image (a path, PIL image or array) or a list of them against `policies`
        (names; default every policy of the folder and `custom_policies`, {name: definition})."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        chosen = choose_policies(self.policy_definitions, policies, custom_policies)
        spec = self.model.image_input
        pixels = preprocess_images(images, spec.image_size, "bilinear")  # Gemma3ImageProcessor's resample
        rows = [gemma3_prompt_ids(self.tokenizer, policy_prompt(text), 1, spec) for _ in images for _, text in chosen]
        logits = self._yes_no_logits(rows, pixels, len(chosen))
        probabilities = mx.softmax(logits, axis=-1)  # over the two, as the reference
        return ShieldGemma2Output([n for n, _ in chosen], np.array(logits), np.array(probabilities))

    def _yes_no_logits(self, rows: list[list[int]], pixels: mx.array, per_image: int) -> mx.array:
        """float32 [rows, 2]: the last position's Yes and No logits of left-padded rows, in one call.
        The tower runs once per image; its features serve that image's `per_image` rows."""
        T = max(len(r) for r in rows)
        ids = mx.array([[self.tokenizer.pad_id] * (T - len(r)) + r for r in rows], dtype=mx.int32)
        real = mx.array([[False] * (T - len(r)) + [True] * len(r) for r in rows])
        vlm = self.model.model
        features = mx.repeat(vlm.image_features(pixels), per_image, axis=0)
        h = embed_with_images(vlm.language_model, ids, self.model.args.image_token_index, lambda _: features,
                              pixels, "<image_soft_token>")
        hidden = vlm(ids, padding_mask=real, input_embeddings=h)[:, -1]  # left padding: the last is real
        args = self.model.args
        return self.model.logits(hidden)[:, [args.yes_token_index, args.no_token_index]].astype(mx.float32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma.shieldgemma2",
                                description="P(Yes: the image violates the policy) for each image and policy.")
    p.add_argument("--model", required=True, help="a ShieldGemma 2 folder or hub id (google/shieldgemma-2-4b-it)")
    p.add_argument("--image", action="append", required=True, metavar="PATH", help="an image (repeatable)")
    p.add_argument("--policy", action="append", metavar="NAME",
                   help="a policy name (repeatable; default: every policy: dangerous, sexual, violence)")
    p.add_argument("--custom-policy", action="append", default=[], metavar="NAME=DEFINITION",
                   help="add (or redefine) a policy, e.g. 'ip=No IP: The image shall not ...'")
    return p


def custom_policies_from(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise PolicyError(f"--custom-policy takes NAME=DEFINITION, got {item!r:.80}")
        out[name.strip()] = text.strip()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run():
        custom = custom_policies_from(args.custom_policy)
        shield = ShieldGemma2.load(args.model)
        out = shield(args.image, args.policy, custom)
        for image, row in zip(args.image, out.yes):
            for policy, p in zip(out.policies, row):
                print(f"{image}\t{policy}\tP(Yes)={p:.6f}")

    return run_command(run, "classification stopped")


if __name__ == "__main__":
    sys.exit(main())
