"""The bad-request suite: malformed and hostile requests to the real server (a subprocess), sent with
raw `httpx`.  Each must be a 4xx carrying OpenAI's error object (message, type, param, code), and
the server must still answer /health and a good request after all of them.  SECURITY.md states
the count (`len(CASES)`).
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from test_server import BODY_LIMIT as LIMIT
from test_server import EMBED, GEMMA3, VLM3, shared_server

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def chat(**fields) -> dict:
    return {"model": GEMMA3, "messages": USER, **fields}


def completion(**fields) -> dict:
    return {"model": GEMMA3, "prompt": "hi", **fields}


# (name, method, path, body: dict (sent as JSON) | bytes | None, extra headers, expected status)
CASES = [
    ("malformed json", "POST", CHAT, b'{"model": ', {}, 400),
    ("empty body", "POST", CHAT, b"", {}, 400),
    ("json array", "POST", CHAT, b"[]", {}, 400),
    ("json string", "POST", CHAT, b'"hello"', {}, 400),
    ("invalid utf-8", "POST", CHAT, b'{"model": "\xff\xfe"}', {}, 400),
    ("lone surrogate", "POST", CHAT, json.dumps(chat(messages=[{"role": "user", "content": "\ud800"}])).encode(),
     {}, 400),
    ("nested 4000 deep", "POST", CHAT, b"[" * 4000 + b"]" * 4000, {}, 400),
    ("body over the limit", "POST", CHAT, json.dumps(chat(user="x" * (2 * LIMIT))).encode(), {}, 413),
    ("content-length over the limit", "POST", CHAT, b"{}", {"Content-Length": str(10 * LIMIT)}, 413),
    ("not json content type", "POST", CHAT, b"model=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("no model", "POST", CHAT, {"messages": USER}, {}, 400),
    ("unknown model", "POST", CHAT, chat(model="gpt-4o"), {}, 404),
    ("model path traversal", "POST", CHAT, chat(model="../../etc/passwd"), {}, 404),
    ("model not a string", "POST", CHAT, chat(model=7), {}, 400),
    ("no messages", "POST", CHAT, {"model": GEMMA3}, {}, 400),
    ("empty messages", "POST", CHAT, chat(messages=[]), {}, 400),
    ("messages an object", "POST", CHAT, chat(messages={"role": "user"}), {}, 400),
    ("message without role", "POST", CHAT, chat(messages=[{"content": "hi"}]), {}, 400),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), {}, 400),
    ("content a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), {}, 400),
    ("unknown part type", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "video"}]}]), {}, 400),
    ("file part (not yet)", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "file",
                                                                                       "file": {}}]}]), {}, 400),
    ("text part without text", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), {},
     400),
    ("image to a text-only model", "POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), {}, 400),
    ("audio to a text-only model", "POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]), {}, 400),
    ("tool message answering no call", "POST", CHAT, chat(messages=[*USER, {"role": "tool", "content": "x",
                                                                              "tool_call_id": "1"}]), {}, 400),
    ("assistant first", "POST", CHAT, chat(messages=[{"role": "assistant", "content": "hi"}]), {}, 400),
    ("two users in a row", "POST", CHAT, chat(messages=[*USER, *USER]), {}, 400),
    ("unknown field in a message", "POST", CHAT, chat(messages=[{"role": "user", "content": "hi", "x": 1}]), {}, 400),
    ("unknown top-level field", "POST", CHAT, chat(frobnicate=True), {}, 400),
    ("temperature a string", "POST", CHAT, chat(temperature="0.5"), {}, 400),
    ("temperature negative", "POST", CHAT, chat(temperature=-1), {}, 400),
    ("temperature too high", "POST", CHAT, chat(temperature=3), {}, 400),
    ("temperature NaN", "POST", CHAT, json.dumps(chat(temperature=float("nan"))).encode(), {}, 400),
    ("top_p zero", "POST", CHAT, chat(top_p=0), {}, 400),
    ("top_p above one", "POST", CHAT, chat(top_p=1.5), {}, 400),
    ("top_k negative", "POST", CHAT, chat(top_k=-1), {}, 400),
    ("min_p one", "POST", CHAT, chat(min_p=1.0), {}, 400),
    ("presence_penalty out of range", "POST", CHAT, chat(presence_penalty=3), {}, 400),
    ("frequency_penalty out of range", "POST", CHAT, chat(frequency_penalty=-5), {}, 400),
    ("repetition_penalty zero", "POST", CHAT, chat(repetition_penalty=0), {}, 400),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), {}, 400),
    ("max_tokens a string", "POST", CHAT, chat(max_tokens="10"), {}, 400),
    ("max_tokens a boolean", "POST", CHAT, chat(max_tokens=True), {}, 400),
    ("max_completion_tokens negative", "POST", CHAT, chat(max_completion_tokens=-3), {}, 400),
    ("n zero", "POST", CHAT, chat(n=0), {}, 400),
    ("n huge", "POST", CHAT, chat(n=100000), {}, 400),
    ("five stop strings", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), {}, 400),
    ("empty stop string", "POST", CHAT, chat(stop=""), {}, 400),
    ("stop a number", "POST", CHAT, chat(stop=12), {}, 400),
    ("logit_bias key not an id", "POST", CHAT, chat(logit_bias={"abc": 1}), {}, 400),
    ("logit_bias id past the vocabulary", "POST", CHAT, chat(logit_bias={"999999": 1}), {}, 400),
    ("logit_bias value out of range", "POST", CHAT, chat(logit_bias={"5": 1000}), {}, 400),
    ("seed negative", "POST", CHAT, chat(seed=-1), {}, 400),
    ("seed a string", "POST", CHAT, chat(seed="x"), {}, 400),
    ("logprobs a string", "POST", CHAT, chat(logprobs="yes"), {}, 400),
    ("top_logprobs too many", "POST", CHAT, chat(logprobs=True, top_logprobs=50), {}, 400),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), {}, 400),
    ("stream a string", "POST", CHAT, chat(stream="yes"), {}, 400),
    ("stream_options without stream", "POST", CHAT, chat(stream_options={"include_usage": True}), {}, 400),
    ("tools an object", "POST", CHAT, chat(tools={"type": "function"}), {}, 400),
    ("tool without a function", "POST", CHAT, chat(tools=[{"type": "function"}]), {}, 400),
    ("tool of another type", "POST", CHAT, chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), {}, 400),
    ("tool name with a space", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b"}}]), {},
     400),
    ("tool declared twice", "POST", CHAT, chat(tools=[TOOL, TOOL]), {}, 400),
    ("tool parameters not an object schema", "POST", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]), {}, 400),
    ("tool_choice naming no tool", "POST", CHAT, chat(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "g"}}), {}, 400),
    ("tool_choice required without tools", "POST", CHAT, chat(tool_choice="required"), {}, 400),
    ("tool_choice a number", "POST", CHAT, chat(tools=[TOOL], tool_choice=3), {}, 400),
    ("tool call arguments not json", "POST", CHAT, chat(messages=[*USER, {"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]), {}, 400),
    ("tool calls on a user message", "POST", CHAT, chat(messages=[{"role": "user", "content": "hi", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), {}, 400),
    ("legacy function message", "POST", CHAT, chat(messages=[*USER, {"role": "function", "name": "f",
                                                                       "content": "x"}]), {}, 400),
    ("legacy functions field", "POST", CHAT, chat(functions=[{"name": "f"}]), {}, 400),
    ("tools beside a corrupt image", "POST", CHAT, chat(model=VLM3, tools=[TOOL], messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), {}, 400),
    ("json_schema without its json_schema", "POST", CHAT, chat(response_format={"type": "json_schema"}), {}, 400),
    ("response_format of an unknown type", "POST", CHAT, chat(response_format={"type": "xml"}), {}, 400),
    ("json_schema name with a space", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "a b", "schema": {"type": "object"}}}), {}, 400),
    ("json_schema not a schema", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}), {}, 400),
    ("json_object with an unknown field", "POST", CHAT, chat(response_format={"type": "json_object", "x": 1}), {}, 400),
    ("bad response_format beside tools", "POST", CHAT, chat(tools=[TOOL], response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}), {}, 400),
    ("unknown chat_template_kwargs", "POST", CHAT, chat(chat_template_kwargs={"add_vision_id": True}), {}, 400),
    ("thinking on Gemma 3", "POST", CHAT, chat(chat_template_kwargs={"enable_thinking": True}), {}, 400),
    ("prompt past the context", "POST", CHAT, chat(messages=[{"role": "user", "content": "a b " * 400}]), {}, 400),
    ("too many messages", "POST", CHAT, chat(messages=[{"role": "user", "content": ""}] * 1100), {}, 400),
    ("completion without prompt", "POST", COMPLETIONS, {"model": GEMMA3}, {}, 400),
    ("completion id past the vocabulary", "POST", COMPLETIONS, completion(prompt=[2, 999999]), {}, 400),
    ("completion negative id", "POST", COMPLETIONS, completion(prompt=[2, -1]), {}, 400),
    ("completion empty prompt", "POST", COMPLETIONS, completion(prompt=""), {}, 400),
    ("completion empty prompt list", "POST", COMPLETIONS, completion(prompt=[]), {}, 400),
    ("completion mixed prompt list", "POST", COMPLETIONS, completion(prompt=[1, "a"]), {}, 400),
    ("completion echo (not yet)", "POST", COMPLETIONS, completion(echo=True), {}, 400),
    ("completion suffix (not yet)", "POST", COMPLETIONS, completion(suffix="end"), {}, 400),
    ("completion logprobs too many", "POST", COMPLETIONS, completion(logprobs=10), {}, 400),
    ("completion prompt past the context", "POST", COMPLETIONS, completion(prompt=[2] * 300), {}, 400),
    ("completion chat field", "POST", COMPLETIONS, completion(messages=USER), {}, 400),
    ("embeddings from a generative model", "POST", EMBEDDINGS, {"model": GEMMA3, "input": "hi"}, {}, 400),
    ("chat with a sentence encoder", "POST", CHAT, chat(model=EMBED), {}, 400),
    ("embeddings without input", "POST", EMBEDDINGS, {"model": EMBED}, {}, 400),
    ("embeddings empty string", "POST", EMBEDDINGS, {"model": EMBED, "input": ""}, {}, 400),
    ("embeddings empty list", "POST", EMBEDDINGS, {"model": EMBED, "input": []}, {}, 400),
    ("embeddings token ids (not yet)", "POST", EMBEDDINGS, {"model": EMBED, "input": [2, 3]}, {}, 400),
    ("embeddings too many inputs", "POST", EMBEDDINGS, {"model": EMBED, "input": ["a"] * 257}, {}, 400),
    ("embeddings dimensions zero", "POST", EMBEDDINGS, {"model": EMBED, "input": "a", "dimensions": 0}, {}, 400),
    ("embeddings dimensions past the model", "POST", EMBEDDINGS, {"model": EMBED, "input": "a", "dimensions": 4096},
     {}, 400),
    ("embeddings unknown prompt_name", "POST", EMBEDDINGS, {"model": EMBED, "input": "a", "prompt_name": "x"}, {},
     400),
    ("embeddings unknown encoding", "POST", EMBEDDINGS, {"model": EMBED, "input": "a", "encoding_format": "hex"}, {},
     400),
    ("GET on a POST route", "GET", CHAT, None, {}, 405),
    ("POST on a GET route", "POST", "/v1/models", {}, {}, 405),
    ("unknown path", "GET", "/v1/nothing-here", None, {}, 404),
    ("unknown model card", "GET", "/v1/models/nope", None, {}, 404),
]


@pytest.fixture(scope="module")
def server():
    return shared_server()


def send(url: str, method: str, path: str, body, headers: dict) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    if "Content-Length" in headers:  # a lying header: httpx will not send one, a raw socket will
        return raw(url, method, path, body, headers)
    head = {"Content-Type": "application/json", **headers} if body is not None else headers
    return httpx.request(method, url + path, content=body, headers=head, timeout=30)


def raw(url: str, method: str, path: str, body: bytes, headers: dict) -> httpx.Response:
    """Send bytes as they are (headers included) and read the answer."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host, "Content-Type": "application/json",
                                                 "Connection": "close", **headers}.items())
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return httpx.Response(int(status_line.split()[1]), content=rest.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_a_4xx_with_an_openai_error(server, case):
    name, method, path, body, headers, status = case
    r = send(server, method, path, body, headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in r.text and "/work/" not in error["message"].replace(GEMMA3, "").replace(EMBED, "")


def test_the_suite_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_field_errors_name_the_field(server):
    error = send(server, "POST", CHAT, chat(temperature=7), {}).json()["error"]
    assert error["param"] == "temperature" and error["code"] == "invalid_value"
    part = chat(messages=[{"role": "user", "content": [{"type": "text"}]}])
    assert send(server, "POST", CHAT, part, {}).json()["error"]["param"] == "messages.0.content.0.text"
    error = send(server, "POST", CHAT, chat(frobnicate=1), {}).json()["error"]
    assert (error["param"], error["code"]) == ("frobnicate", "unknown_parameter")
    error = send(server, "POST", CHAT, chat(messages=[{"role": "user", "content": "a " * 400}]), {}).json()["error"]
    assert error["code"] == "context_length_exceeded"


def test_server_still_serves_after_the_suite(server):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    r = httpx.post(server + CHAT, json=chat(max_tokens=3, temperature=0), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
