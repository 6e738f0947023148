"""OpenAI's error object, and the one exception type every refusal in the server raises.

Every 4xx and 5xx the server sends has OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises its own typed
errors (BadRequestError, AuthenticationError, NotFoundError, ...) on our answers.  Messages say
what was wrong with the request; no traceback or server path ever goes into one.
"""

from __future__ import annotations

from pydantic import ValidationError

# OpenAI's error types by HTTP status.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A refusal (or a failure) to send as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object for `status`."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_validation(error: ValidationError) -> ApiError:
    """A pydantic error as a 400 naming the offending field (its dotted path).

    Of a union's errors (one per member tried) the deepest is the most specific: a bad content
    part is named as such, not as "content should be a string".
    """
    errors = error.errors(include_url=False, include_input=False)
    first = max(errors, key=lambda e: len(e["loc"]))
    loc = [p for p in first["loc"] if not _is_union_tag(p)]
    # A discriminated union (content parts) puts the tag it chose after the part's index.
    loc = [p for i, p in enumerate(loc) if not (i and isinstance(loc[i - 1], int) and p in _PART_TAGS)]
    path = ".".join(str(p) for p in loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {path}", path or None, "unknown_parameter")
    message = first["msg"].removeprefix("Value error, ")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return ApiError(400, f"{path}: {message}" if path else message, path or None, "invalid_value")


_PART_TAGS = {"text", "image_url", "input_audio", "file", "image", "audio"}


def _is_union_tag(part) -> bool:
    # pydantic names the union member it tried ("str", "list[int]", "function-after[...]") in `loc`:
    # not part of the field's path as a client spells it.
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict",
                                                               "constrained-str", "constrained-int", "none"})
