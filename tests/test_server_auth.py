"""`--api-key` on a real server: /stats (the operator's view of jobs and memory) sits behind the key
like every /v1 path, and /health alone stays open (liveness probes carry no key).

app.py's BearerAuth answers every path but OPEN_PATHS ("/health") with a 401 in OpenAI's error
shape unless `Authorization: Bearer <key>` carries the key; the official `openai` client reads that
401 as its own AuthenticationError (code "invalid_api_key"), which is what checks the shape here.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import FIXTURES
from test_server import start_server, stop_server

MODEL = str(FIXTURES / "tiny_gemma")
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def url():
    proc, url = start_server("--model", MODEL, "--api-key", KEY)
    yield url
    stop_server(proc)


def refused(response: httpx.Response) -> None:
    """A 401 with OpenAI's error object for a missing or wrong key."""
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_api_key", None)
    assert KEY not in response.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
                                     {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": "Bearer"},
                                     {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                                     {"X-Api-Key": KEY}])
def test_stats_refuses_a_request_without_the_key(url, headers):
    refused(httpx.get(url + "/stats", headers=headers))
    refused(httpx.get(url + "/stats/", headers=headers))  # (no way round it through a redirect)


def test_stats_answers_with_the_key(url):
    for scheme in ("Bearer", "bearer"):  # (the scheme is case-insensitive, RFC 7235)
        r = httpx.get(url + "/stats", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200
        stats = r.json()
        assert [m["id"] for m in stats["models"]] == [MODEL]
        assert stats["models"][0]["active_jobs"] == 0 and stats["mlx_active_memory"] > 0


def test_the_openai_client_reads_the_refusal_as_its_own_error(url):
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).get("/stats", cast_to=object)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert good.get("/stats", cast_to=object)["models"][0]["id"] == MODEL


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}"}])
def test_health_stays_open(url, headers):
    r = httpx.get(url + "/health", headers=headers)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
