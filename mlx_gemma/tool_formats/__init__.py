"""Gemma's function-calling syntaxes, written out in code (no Jinja): values, declarations, calls.

`literals` writes and reads the value syntax Gemma 4 and FunctionGemma share (unquoted keys,
strings between a quote token); `gemma4` renders Gemma 4's tool declarations.  The OpenAI-facing
API (checking `tools`, parsing model output into `tool_calls`, streaming) is mlx_gemma.tool_calls.
"""
