"""Bad requests get a 4xx with a message, never a 500: the cases found by probing, then every route fuzzed
with hostile path segments, query strings and bodies. Through a real server on loopback (raw requests, so
a 100 KB URL or a NUL byte reaches the app as a browser would send it)."""

from __future__ import annotations

import json
import random
from urllib.parse import quote

import pytest

from interplab.features.reader import MAX_QUERY
from interplab.web.guard import MAX_REQUEST_HEAD, MAX_URL
from tests.web.test_guard import request

HUGE = "9" * 30  # beyond int64
WEIRD = [
    HUGE,
    "-" + HUGE,
    "-1",
    "0",
    "1e5",
    "1.5",
    "nan",
    "inf",
    "%00",
    "%ff%fe",
    "%22%27%3C",
    "..%2F..",
    "a" * 5000,
    "%E2%80%A8",
    "0x10",
    " 1",
    "",
    "%2e%2e",
    "null",
    "true",
    "[]",
    "{}",
]


def error_message(status: int, body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        return json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return text


@pytest.mark.parametrize(
    "path",
    [
        f"/db/tiny/feature/{HUGE}",
        f"/api/db/tiny/feature/{HUGE}",
        "/db/tiny/feature/-1",
        f"/db/tiny/?page_no={HUGE}",
        "/db/tiny/?page_no=92233720368547758",  # * 100 overflows int64
        "/db/tiny/?page_no=-3",
        "/db/tiny/?order=" + "x" * 1000,
        "/db/tiny/search?q=" + "a" * 100_000,  # SQLite: "LIKE or GLOB pattern too complex"
        "/db/tiny/search?token=" + "a" * 100_000,
        f"/run/{HUGE}",
    ],
)
def test_reported_500s_are_4xx_with_a_message(server_addr, path):
    status, _, body = request(server_addr, "GET", path)
    assert 400 <= status < 500, (path[:80], status)
    assert len(error_message(status, body).strip()) > 10


@pytest.mark.parametrize("size", [MAX_URL + 1, 17_000, 100_000, 400_000, MAX_REQUEST_HEAD - 4096])
@pytest.mark.parametrize("route", ["/db/tiny/search?token=", "/api/db/tiny/feature/1?x=", "/nowhere/"])
def test_long_urls_are_read_whole_and_answered_414(server_addr, route, size):
    """Above the server's own head limit (h11: 16 KiB) it would close mid-send: a reset, not an answer."""
    path = route + "a" * (size - len(route))
    for _ in range(3):  # a reset comes by chance: repeat
        status, _, body = request(server_addr, "GET", path)
        assert status == 414, (route, size, status)
        assert f"{size:,} characters" in error_message(status, body)
        assert f"at most {MAX_URL:,}" in error_message(status, body)
        assert f"search texts are at most {MAX_QUERY:,} characters" in error_message(status, body)


def test_urls_up_to_the_bound_reach_the_routes(server_addr):
    route = "/db/tiny/search?q=ab&token="
    status, _, _ = request(server_addr, "GET", route + "a" * (MAX_URL - len(route)))
    assert status == 422  # the route's own bound on search texts, with its message
    status, _, _ = request(server_addr, "GET", "/db/tiny/search?q=ab&pad=" + "a" * (MAX_URL - 30))
    assert status == 200


@pytest.mark.parametrize(
    "q", ["%00", "a%00b", "%22", "%22%22", "*", "NEAR(a%20b)", "a%20OR", "%25", "_", "%5C"]
)
def test_search_text_is_literal(server_addr, q):
    status, _, body = request(server_addr, "GET", f"/db/tiny/search?q={q}&token={q}")
    assert status == 200, (q, body[:300])


def test_like_wildcards_match_only_themselves(writable_server):
    addr = writable_server
    request(addr, "POST", "/api/db/tiny/feature/8/label", body={"explanation": "ax_b 100%"})
    assert b"feature/8" in request(addr, "GET", "/db/tiny/search?q=x_b")[2]
    assert b"feature/8" not in request(addr, "GET", "/db/tiny/search?q=a_x")[2]
    assert b"feature/8" in request(addr, "GET", "/db/tiny/search?q=100%25")[2]


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "1 2", "strength": NaN}',
        b'{"prompt": "1 2", "strength": Infinity}',
        b'{"prompt": "1 2", "value": -Infinity}',
        b'{"prompt": "1 2", "value": NaN}',
        b'{"prompt": "1 2", "strength": 1e308}',
        b'{"prompt": "1 2", "value": 1e300}',
        b'{"prompt": "1 2", "strength": 1, "value": 1}',
        b'{"prompt": "1 2", "max_new_tokens": 1e30}',
        b'{"prompt": "' + HUGE.encode() + b'"}',
        b'{"prompt": "1 2", "mode": "multiply"}',
        b'{"prompt": ""}',
        b'{"prompt": 12}',
        b"[]",
        b"null",
        b"not json",
        b"",
    ],
)
def test_bad_steering_requests_are_4xx(server_addr, body):
    status, _, text = request(server_addr, "POST", "/api/db/tiny/feature/2/steer", body=body)
    assert 400 <= status < 500, (body, status, text[:200])
    assert error_message(status, text)


def _fill(path: str, rng: random.Random) -> str:
    out = path
    while "{" in out:
        a, b = out.index("{"), out.index("}")
        name = out[a + 1 : b]
        value = rng.choice(WEIRD + (["tiny", "tiny", "nope"] if name == "db" else ["3", "0"]))
        out = out[:a] + value + out[b + 1 :]
    return out


def _bodies(rng: random.Random) -> list[bytes]:
    values = [
        None,
        0,
        -1,
        10**30,
        1.5,
        "",
        "x" * 5000,
        "1 2 3",
        "#1 #99999999999",
        [],
        {},
        True,
        "\u2028<!--",
    ]
    keys = ["prompt", "explanation", "strength", "value", "mode", "max_new_tokens"]
    out = [b"", b"{", b"[]", b"null", b'"x"', b"\x00\xff", json.dumps({k: "1 2" for k in keys}).encode()]
    for _ in range(12):
        out.append(
            json.dumps({k: rng.choice(values) for k in rng.sample(keys, rng.randint(1, len(keys)))}).encode()
        )
    return out


def test_every_route_fuzzed_never_500s(server_addr, web_app):
    """Every route of the app (as the app lists them), with hostile path values, query strings, methods and
    JSON bodies: no 5xx, and every 4xx says something."""
    from fastapi.routing import APIRoute

    rng = random.Random(0)
    routes = [(r.path, sorted(r.methods)) for r in web_app.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 10
    queries = [
        "",
        "?q=%00",
        "?page_no=" + HUGE,
        "?order=-x",
        "?order=density&page_no=1",
        "?token=%23" + HUGE,
        "?token=%23-1",
        "?q=" + "b" * 2000,
        "?a=1&a=2",
        "?q=%ff",
        "?token=%00%00",
    ]
    tried = 0
    for path, methods in routes:
        for _ in range(8):
            url = quote(_fill(path, rng), safe="/%?=&-") + rng.choice(queries)
            for method in [*methods, "DELETE", "PUT"]:
                bodies = _bodies(rng) if method in ("POST", "PUT") else [None]
                for body in bodies[:6]:
                    status, _, text = request(server_addr, method, url, body=body)
                    tried += 1
                    assert status < 500, (method, url[:120], body, text[:300])
                    if status >= 400:
                        assert error_message(status, text).strip(), (method, url[:120])
    assert tried > 300
