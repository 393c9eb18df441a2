"""Host allowlist (DNS rebinding), same-origin state changes and HEAD, through a real server on loopback.

Requests are raw `http.client` requests, so the Host, Origin and Sec-Fetch-Site headers are exactly what a
browser (or an attacker's page) would send."""

from __future__ import annotations

import http.client
import json

import pytest

from interplab.web.guard import is_loopback, normalise_allowed, split_host
from tests.web.conftest import live_server


def request(addr, method: str, path: str, *, host: str | None = None, body=None, headers=None):
    """(status, headers, body bytes) of one raw request; ``host`` replaces the Host header."""
    conn = http.client.HTTPConnection(*addr, timeout=30)
    hdrs = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        hdrs.setdefault("Content-Type", "application/json")
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host if host is not None else f"{addr[0]}:{addr[1]}")
    for k, v in hdrs.items():
        conn.putheader(k, v)
    if data is not None:
        conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def label_of(addr, feature: int) -> str | None:
    _, _, body = request(addr, "GET", f"/api/db/tiny/feature/{feature}")
    label = json.loads(body)["label"]
    return None if label is None else label["explanation"]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LOCALHOST",
        "localhost.",
        "127.8.9.10:{port}",
        "[::1]:{port}",
        "[::1]",
        "app.localhost:{port}",
    ],
)
def test_loopback_names_are_served(server_addr, host):
    status, _, _ = request(server_addr, "GET", "/", host=host.format(port=server_addr[1]))
    assert status == 200


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1.evil.example",
        "0.0.0.0:{port}",
        "192.168.1.5",
        "localhost.evil.example",
        "evil.example@127.0.0.1",
        "",
        "a b",
        "[::1",
        "[::2]",
        "127.0.0.1:99999",
        "127.0.0.1:{port}/x",
    ],
)
def test_other_host_names_get_421_and_nothing_else(server_addr, host):
    for method, path, body in [
        ("GET", "/", None),
        ("GET", "/db/tiny/feature/1", None),
        ("GET", "/api/db/tiny/feature/1", None),
        ("GET", "/static-vendor/plotly.min.js", None),
        ("POST", "/api/db/tiny/feature/1/label", {"explanation": "rebound"}),
    ]:
        status, _, text = request(server_addr, method, path, host=host.format(port=server_addr[1]), body=body)
        assert status == 421, (host, path)
        assert b"is not served" in text and b"--allow-host" in text
    assert label_of(server_addr, 1) != "rebound"


def test_allowed_host_names_are_served(web_setup, writable_db):
    from interplab.web.app import create_app

    app = create_app([writable_db], allowed_hosts=["lab.example", "Other.Example:8000"])
    with live_server(app) as addr:
        assert request(addr, "GET", "/", host="lab.example:8000")[0] == 200
        assert request(addr, "GET", "/", host="other.example")[0] == 200
        assert request(addr, "GET", "/", host="third.example")[0] == 421
        origin = {"Origin": "http://lab.example:8000"}
        status, _, _ = request(
            addr,
            "POST",
            "/api/db/tiny/feature/2/label",
            host="lab.example:8000",
            body={"explanation": "ok"},
            headers=origin,
        )
        assert status == 200
    with pytest.raises(ValueError, match="not a host name"):
        create_app([web_setup["db"]], allowed_hosts=["http://x/y"])


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},  # another port is another origin
        {"Origin": "http://localhost:{port}"},  # the same machine under another name: another origin
        {"Origin": "file://"},
        {"Origin": "garbage"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"},
    ],
)
def test_cross_origin_state_changes_are_refused(server_addr, headers):
    headers = {k: v.format(port=server_addr[1]) for k, v in headers.items()}
    before = label_of(server_addr, 4)
    for path, body in [
        ("/api/db/tiny/feature/4/label", {"explanation": "cross-origin"}),
        ("/api/db/tiny/feature/4/steer", {"prompt": "1 2", "max_new_tokens": 1}),
        ("/api/attention", {"prompt": "1 2"}),
    ]:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, _, text = request(server_addr, method, path, body=body, headers=headers)
            assert status == 403, (method, path, headers)
            assert "refused" in json.loads(text)["error"]
    assert label_of(server_addr, 4) == before


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, scripts: no Origin, no Sec-Fetch-Site
        {"Origin": "http://127.0.0.1:{port}"},
        {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},
    ],
)
def test_same_origin_state_changes_are_accepted(writable_server, headers):
    headers = {k: v.format(port=writable_server[1]) for k, v in headers.items()}
    status, _, _ = request(
        writable_server,
        "POST",
        "/api/db/tiny/feature/6/label",
        body={"explanation": "same origin"},
        headers=headers,
    )
    assert status == 200 and label_of(writable_server, 6) == "same origin"


def test_head_is_answered_on_every_get_route(server_addr, web_app):
    from fastapi.routing import APIRoute

    paths = [
        "/",
        "/db/tiny/",
        "/db/tiny/feature/3",
        "/db/tiny/search?q=x",
        "/run/0",
        "/run/0/files/plotly.min.js",
        "/run/0/dt/frame/0/0.png",
        "/db/tiny/dt/frame/0/0.png",
        "/run/0/graph",
        "/attention",
        "/api/db/tiny/feature/3",
        "/static/app.css",
        "/static-vendor/plotly.min.js",
        "/api/docs",
        "/db/tiny/map",
        "/db/tiny/lists",
        "/db/tiny/lists/0",
        "/db/tiny/lists/0/export.json",
        "/db/tiny/lists/0/export.csv",
        "/compare/3",
        "/db/tiny/similar",
        "/api/db/tiny/feature/3/explanations",  # llm's routes (issue 18)
        "/api/db/tiny/explanations?q=x",
        "/search?q=x",  # every served database (issue 20)
    ]
    get_routes = {r.path for r in web_app.routes if isinstance(r, APIRoute) and "GET" in r.methods}
    templated = {
        p.split("?")[0]
        .replace("/3", "/{index}")
        .replace("/0", "/{index}")
        .replace("/tiny", "/{db}")
        .replace("/files/plotly.min.js", "/files/{rel:path}")
        .replace("/frame/{index}/{index}.png", "/frame/{episode}/{step}.png")
        .replace("/lists/{index}", "/lists/{list_id}")
        for p in paths
    }
    assert get_routes - {"/db/{db}/random"} <= templated | {"/api/docs", "/openapi.json"}, (
        "a GET route is not tried"
    )
    for path in [*paths, "/db/tiny/feature/999", "/db/tiny/random"]:
        get_status, get_headers, get_body = request(server_addr, "GET", path)
        status, headers, body = request(server_addr, "HEAD", path)
        assert status == get_status != 405, path
        assert body == b""
        if "content-length" in {k.lower() for k in get_headers}:
            length = {k.lower(): v for k, v in headers.items()}["content-length"]
            assert int(length) == len(get_body), path
    assert request(server_addr, "HEAD", "/api/attention")[0] == 405  # a POST-only route stays so


def test_host_parsing():
    assert split_host("LocalHost:8000") == ("localhost", "8000")
    assert split_host("[::1]:80") == ("::1", "80")
    assert split_host("example.com.") == ("example.com", None)
    for bad in ["", "a:b:c", "[::1]x", "x:0", "x:65536", "x/y", "u@h", "h?q", "[::1"]:
        assert split_host(bad) is None, bad
    assert all(is_loopback(n) for n in ["localhost", "127.0.0.1", "127.255.0.9", "::1", "a.localhost"])
    assert not any(is_loopback(n) for n in ["0.0.0.0", "10.0.0.1", "localhost.example", "::2", "example"])
    assert normalise_allowed(["Lab.Example:80", "[fe80::1]"]) == {"lab.example", "fe80::1"}


def test_serve_refuses_a_bad_allow_host(web_setup):
    from typer.testing import CliRunner

    from interplab.cli.main import app

    r = CliRunner().invoke(app, ["serve", "--db", str(web_setup["db"]), "--allow-host", "http://x/y"])
    assert r.exit_code != 0 and "not a host name" in r.output
