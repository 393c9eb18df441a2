"""A tiny OpenAI-compatible chat-completions server on loopback, for testing HTTP backends offline.

>>> with LLMServer(lambda messages, body: "fires on 'the'") as server:
...     backend = OpenAIBackend(server.base_url, "test-model", api_key_env="KEY")  # with KEY=server.api_key

``reply(messages, body)`` returns the completion's text, or ``(text, top_logprobs)`` where ``top_logprobs``
has one ``{token: logprob}`` dict per generated token (the first key is the token generated). Failures are
queued with `LLMServer.fail` (one mode per coming request) or set for every request with ``always``:

- ``"429"``: status 429 with a ``Retry-After`` header of `LLMServer.retry_after` seconds;
- ``"500"``: status 500;
- ``"hang"``: sleeps `LLMServer.hang_s` before answering (a client with a shorter timeout times out);
- ``"malformed"``: status 200 with a body that is not JSON;
- ``"no_choices"``: status 200 with JSON that has no ``choices``.

A request whose ``Authorization`` is not ``Bearer <api_key>`` gets 401 (``api_key=None``: no check). Every
request body is kept in `LLMServer.requests` (with its headers in `LLMServer.headers`).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = Callable[[list[dict[str, str]], dict[str, Any]], "str | tuple[str, list[dict[str, float]]]"]
FAIL_MODES = ("429", "500", "hang", "malformed", "no_choices")


def echo_reply(messages: list[dict[str, str]], body: dict[str, Any]) -> str:
    """The default reply: the last message's content, reversed word order (deterministic, prompt-dependent)."""
    return " ".join(reversed(messages[-1]["content"].split()))


class LLMServer:
    """Start with ``with LLMServer(reply) as server:`` (or `start` / `stop`); ``server.base_url`` ends in /v1."""

    def __init__(
        self,
        reply: Reply | None = None,
        *,
        api_key: str | None = "test-key",
        model: str = "test-model",
        always: str | None = None,
    ) -> None:
        if always is not None and always not in FAIL_MODES:
            raise ValueError(f"unknown failure mode {always!r}; valid: {FAIL_MODES}")
        self.reply = reply or echo_reply
        self.api_key = api_key
        self.model = model
        self.always = always
        self.retry_after = "0"
        self.hang_s = 2.0
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._fail: deque[str] = deque()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def fail(self, *modes: str) -> None:
        """Queue failure modes, one for each of the next requests (then they succeed again)."""
        for m in modes:
            if m not in FAIL_MODES:
                raise ValueError(f"unknown failure mode {m!r}; valid: {FAIL_MODES}")
        self._fail.extend(modes)

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    def start(self) -> LLMServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- one request -----------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length", 0) or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(h, 400, {"error": {"message": "the request body is not JSON"}})
        with self._lock:
            self.requests.append(body)
            self.headers.append(dict(h.headers))
            mode = self._fail.popleft() if self._fail else self.always
        if not h.path.rstrip("/").endswith("/chat/completions"):
            return self._send(h, 404, {"error": {"message": f"no such path {h.path}"}})
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(
                h, 401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}
            )
        if mode == "429":
            return self._send(
                h, 429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": self.retry_after}
            )
        if mode == "500":
            return self._send(h, 500, {"error": {"message": "internal error"}})
        if mode == "hang":
            time.sleep(self.hang_s)
        if mode == "malformed":
            return self._send_raw(h, 200, b"{this is not json")
        if mode == "no_choices":
            return self._send(h, 200, {"id": "x", "object": "chat.completion"})
        out = self.reply(body["messages"], body)
        text, top = out if isinstance(out, tuple) else (out, None)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        if body.get("logprobs"):
            if top is None:  # one "token" per whitespace-separated piece, certain
                top = [{piece: 0.0} for piece in text.split(" ")]
            k = int(body.get("top_logprobs") or 0)
            choice["logprobs"] = {
                "content": [
                    {
                        "token": next(iter(alts)),
                        "logprob": next(iter(alts.values())),
                        "top_logprobs": [
                            {"token": t, "logprob": v}
                            for t, v in sorted(alts.items(), key=lambda kv: -kv[1])[:k]
                        ],
                    }
                    for alts in top
                ]
            }
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        self._send(
            h,
            200,
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "model": body.get("model", self.model),
                "choices": [choice],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(text.split()),
                    "total_tokens": prompt_tokens + len(text.split()),
                },
            },
        )

    def _send(self, h: BaseHTTPRequestHandler, status: int, obj: Any, headers: dict | None = None) -> None:
        self._send_raw(h, status, json.dumps(obj).encode(), headers)

    @staticmethod
    def _send_raw(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass
