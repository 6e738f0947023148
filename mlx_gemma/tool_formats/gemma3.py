"""Tool calling for Gemma 3 (and earlier) instruction-tuned models, which have no tool tokens: the
prompt-based format Google documents ("Function calling with Gemma", ai.google.dev/gemma/docs/
capabilities/function-calling), in its JSON variant.

Of the guide's two documented prompts (Python-style `[f(a=1)]` calls or JSON objects) this takes
the JSON one: OpenAI arguments are JSON already, so nothing is lost or re-quoted on the way in or
out, and JSON strings escape unambiguously where Python-call text needs a Python literal parser.

    {system, if any}\\n\\n{INSTRUCTION}\\n{the functions as a JSON list, indent 2}   (folded into the
    first user turn by Gemma 3's template, as it folds a system prompt)
    model:  {"name": "f", "parameters": {...}}   one object per call, one per line
    user:   ```tool_output\\n{result}\\n```        the tool messages after a call, one user turn

The guide shows no format for results; ```tool_output``` is the one Google's Gemma function-calling
cookbook ("meme generator" guide, ai.google.dev/gemma/docs/meme-generator) feeds back.  A reply is
read as calls only if all of it is (the guide: no other text with a call), else it is content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from .checks import tool_call_arguments

# The guide's instruction for the JSON variant, with its line breaks.
INSTRUCTION = ("You have access to functions. If you decide to invoke any of the function(s),\n"
               "you MUST put it in the format of\n"
               '{"name": function name, "parameters": dictionary of argument name and its value}\n'
               "You SHOULD NOT include any other text in the response if you call a function")
FENCES = ("```json", "```tool_code", "```")  # code fences a reply may wrap its calls in


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, Mapping):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return json.dumps(content, ensure_ascii=False)


def messages_with_tools(messages: list, tools: list[dict]) -> list[dict]:
    """`messages` as plain Gemma 3 messages: the tools declared in the system prompt, each
    assistant's calls as JSON lines, each run of `tool` messages one user turn."""
    out: list[dict] = []
    rest = list(messages)
    system = rest.pop(0)["content"] if rest and isinstance(rest[0], Mapping) and rest[0].get("role") == "system" \
        else None
    if tools:
        block = INSTRUCTION + "\n" + json.dumps([t["function"] for t in tools], indent=2, ensure_ascii=False)
        system = block if system is None else _text(system).strip() + "\n\n" + block
    if system is not None:
        out.append({"role": "system", "content": system})
    offset = len(messages) - len(rest)
    for i, m in enumerate(rest):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role == "tool":
            result = f"```tool_output\n{_text(m.get('content')).strip()}\n```"
            if out and out[-1].get("tool_output"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_output": True})
            continue
        calls = tool_call_arguments(m.get("tool_calls"), i + offset) if role in ("assistant", "model") else []
        if calls:
            lines = [json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls]
            text = _text(m.get("content")).strip()
            out.append({"role": role, "content": "\n".join(([text] if text else []) + lines)})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "tool_output"} for m in out]


def read_calls(text: str) -> list[tuple[str, str]] | None:
    """The (name, arguments JSON) of a reply that is nothing but calls, else None."""
    body = text.strip()
    for fence in FENCES:
        if body.startswith(fence) and body.endswith("```") and len(body) >= len(fence) + 3:
            body = body[len(fence):-3].strip()
            break
    decoder, pos, objects = json.JSONDecoder(), 0, []
    while pos < len(body):
        try:
            value, pos = decoder.raw_decode(body, pos)
        except ValueError:
            return None
        objects += value if isinstance(value, list) else [value]
        while pos < len(body) and body[pos] in " \t\r\n,;":
            pos += 1
    calls = []
    for obj in objects:
        # "parameters" is the guide's key; "arguments" (mlx-lm's json_tools, OpenAI) is read too.
        args = obj.get("parameters", obj.get("arguments", {})) if isinstance(obj, Mapping) else None
        if not isinstance(args, Mapping) or not isinstance(obj.get("name"), str) or set(obj) - \
                {"name", "parameters", "arguments"}:
            return None
        calls.append((obj["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None
