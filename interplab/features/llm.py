"""LLM backends behind one interface, for explaining and scoring features (`interplab.features.explain`).

- `OpenAIBackend`: any OpenAI-compatible chat-completions endpoint over HTTP (the standard library's urllib):
  retries with exponential backoff, a 429's ``Retry-After`` honoured, a timeout per request, an optional
  ``requests_per_minute`` limit; a reply that is not a chat completion raises `LLMError` naming what came back.
- `LocalBackend`: a Hugging Face causal LM from a local folder through ``transformers`` (its chat template when
  the tokenizer has one; greedy or sampled; the top log-probs of every generated token).
- `CachedBackend`: wraps either and keeps every response in the feature database's ``llm_cache`` table (keyed
  by a SHA-256 of the request and the backend's name), so a rerun costs nothing.
- `backend_from_config`: the backend the environment (or arguments) configure, None when none is.

>>> backend = OpenAIBackend("http://127.0.0.1:8000/v1", "gpt-4o-mini")  # key from $OPENAI_API_KEY
>>> backend.complete([{"role": "user", "content": "Say hi"}]).text
'Hi!'
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

if TYPE_CHECKING:
    from interplab.features.writer import FeatureWriter

ENV_BASE_URL = "INTERPLAB_LLM_BASE_URL"
ENV_MODEL = "INTERPLAB_LLM_MODEL"
ENV_API_KEY = "INTERPLAB_LLM_API_KEY"
ENV_LOCAL = "INTERPLAB_LLM_LOCAL"
MAX_BACKOFF_S = 60.0
"""the longest wait between two retries (and the most of a ``Retry-After`` that is honoured)"""


class LLMError(RuntimeError):
    """A backend could not complete: the message names the URL or folder, the model, what came back and the fix."""


@dataclass(frozen=True)
class Completion:
    """One completion: its text, token counts (the cost) and, when asked for, the top alternatives' log-probs
    of each generated token (``logprobs[i]``: {token text: log-prob}, the generated token first)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, float]] | None = None


class Backend(Protocol):
    name: str

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion: ...


def _check_messages(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise ValueError("no messages to complete")
    for m in messages:
        if set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
            raise ValueError(
                f"a message must be {{'role': 'system'|'user'|'assistant', 'content': str}}; got {m!r}"
            )


class _RateLimit:
    """At most ``per_minute`` calls a minute: calls are spaced 60 / ``per_minute`` s apart (shared by threads)."""

    def __init__(self, per_minute: float | None) -> None:
        if per_minute is not None and not per_minute > 0:
            raise ValueError(f"requests_per_minute must be positive or None; got {per_minute}")
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            delay = self.next_at - now
            self.next_at = max(now, self.next_at) + self.interval
        if delay > 0:
            time.sleep(delay)


class OpenAIBackend:
    """An OpenAI-compatible chat-completions endpoint: ``POST {base_url}/chat/completions``.

    The key is read from the environment variable ``api_key_env`` when a request is made (``api_key_env=None``:
    no key, for a local server that needs none). Failures that may pass (429, 5xx, timeouts, refused connections)
    are retried ``max_retries`` times with exponential backoff (1, 2, 4, ... s, at most `MAX_BACKOFF_S`; a
    429's ``Retry-After`` when it gives one); others (401, 404, a malformed reply) raise `LLMError` at once."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 5,
        requests_per_minute: float | None = None,
        backoff_s: float = 1.0,
    ) -> None:
        parsed = urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"base_url must be an http(s) URL such as https://api.openai.com/v1; got {base_url!r}"
            )
        if not model:
            raise ValueError("give the model name the endpoint serves (e.g. gpt-4o-mini)")
        if not timeout_s > 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError(
                f"timeout_s must be > 0, max_retries and backoff_s >= 0; got {timeout_s}, {max_retries}, {backoff_s}"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._rate = _RateLimit(requests_per_minute)
        self.name = f"openai:{model}@{parsed.netloc}"
        self.url = f"{self.base_url}/chat/completions"

    def _key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise LLMError(
                f"no API key for {self.url} (model {self.model}): set the environment variable "
                f"{self.api_key_env} (or name another one with api_key_env / --api-key-env; None for a server "
                "that needs no key)"
            )
        return key

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion:
        _check_messages(messages)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            self._rate.wait()
            wait = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                return self._parse(raw, top_logprobs)
            except urllib.error.HTTPError as err:
                detail = _error_text(err)
                if err.code == 429 or err.code >= 500:
                    last = f"HTTP {err.code} ({detail})"
                    if err.code == 429:
                        wait = _retry_after(err.headers.get("Retry-After"), wait)
                elif err.code in (401, 403):
                    raise LLMError(
                        f"{self.url} refused the key in {self.api_key_env} (HTTP {err.code}: {detail}): check it"
                    ) from None
                else:
                    raise LLMError(
                        f"{self.url} answered HTTP {err.code} for model {self.model}: {detail} (check the base "
                        "URL, which should end where /chat/completions follows, and the model name)"
                    ) from None
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = (
                    f"no answer within {self.timeout_s:g} s"
                    if isinstance(reason, TimeoutError) or "timed out" in str(reason)
                    else f"cannot connect ({reason})"
                )
            if attempt < self.max_retries:
                time.sleep(wait)
        raise LLMError(
            f"{self.url} (model {self.model}) failed {self.max_retries + 1} times; last: {last}. Is the server up? "
            "Raise timeout_s / max_retries, or lower requests_per_minute"
        )

    def _parse(self, raw: bytes, top_logprobs: int) -> Completion:
        shown = raw[:200].decode("utf-8", "replace")
        try:
            reply = json.loads(raw)
            choice = reply["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise LLMError(
                f"{self.url} (model {self.model}) sent a reply that is not a chat completion "
                f"({type(err).__name__}: {err}); it began {shown!r}"
            ) from None
        usage = reply.get("usage") or {}
        logprobs = None
        if top_logprobs:
            content = (choice.get("logprobs") or {}).get("content")
            if content is None:
                raise LLMError(
                    f"{self.url} (model {self.model}) returned no logprobs though they were asked for: the "
                    "endpoint or model does not support them (a scorer that needs them cannot use it)"
                )
            logprobs = []
            for tok in content:
                alts = {tok["token"]: float(tok["logprob"])}
                for alt in tok.get("top_logprobs") or []:
                    alts.setdefault(alt["token"], float(alt["logprob"]))
                logprobs.append(alts)
        return Completion(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            logprobs=logprobs,
        )


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read()[:300].decode("utf-8", "replace")
    except OSError:
        return err.reason or ""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body or str(err.reason)


def _retry_after(value: str | None, default: float) -> float:
    """Seconds from a ``Retry-After`` header (a number; an HTTP date is not worth parsing: the default)."""
    try:
        return min(max(float(value), 0.0), MAX_BACKOFF_S) if value is not None else default
    except ValueError:
        return default


class LocalBackend:
    """A causal LM saved with ``save_pretrained`` in a local folder (nothing is downloaded), run through
    ``transformers``: its chat template when the tokenizer has one, else the messages as plain text."""

    def __init__(self, path: str | Path, *, device: str = "cpu", dtype: Any = None) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise LLMError(
                f"{path} is not a Hugging Face model folder (no config.json): give a folder written by "
                "save_pretrained (model and tokenizer)"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = path
        self.device = device
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model: Any = model.to(device)
        self.model.eval()
        # the key-value cache's argument: ``cache`` in newer transformers, ``past_key_values`` before
        self._cache_arg = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        )
        self.name = f"local:{path.name}"

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
        return list(self.tokenizer(text)["input_ids"])

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion:
        import torch

        _check_messages(messages)
        ids = self._prompt_ids(messages)
        eos = self.tokenizer.eos_token_id
        out: list[int] = []
        logprobs: list[dict[str, float]] = []
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            x = torch.tensor([ids], device=self.device)
            past = None
            for _ in range(max_tokens):
                result = self.model(input_ids=x, use_cache=True, **{self._cache_arg: past})
                past = getattr(result, self._cache_arg)
                lp = torch.log_softmax(result.logits[0, -1].float(), -1).cpu()
                if temperature > 0:
                    nxt = int(torch.multinomial((lp / temperature).softmax(-1), 1, generator=gen))
                else:
                    nxt = int(lp.argmax())
                if top_logprobs:
                    alts = {self.tokenizer.decode([nxt]): float(lp[nxt])}
                    vals, idx = lp.topk(top_logprobs)
                    for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
                        alts.setdefault(self.tokenizer.decode([i]), v)
                    logprobs.append(alts)
                if eos is not None and nxt == eos:
                    break
                out.append(nxt)
                x = torch.tensor([[nxt]], device=self.device)
        return Completion(
            text=self.tokenizer.decode(out, skip_special_tokens=True),
            prompt_tokens=len(ids),
            completion_tokens=len(out),
            logprobs=logprobs if top_logprobs else None,
        )


class CachedBackend:
    """``backend`` with every response kept in the feature database's ``llm_cache`` (`FeatureWriter`): the
    same request to the same backend (messages and parameters) is answered from there. ``hits`` and ``misses``
    count this object's lookups; ``prompt_tokens`` / ``completion_tokens`` what the misses cost."""

    def __init__(self, backend: Backend, writer: FeatureWriter) -> None:
        self.backend = backend
        self.writer = writer
        self.name = backend.name
        self.hits = self.misses = self.prompt_tokens = self.completion_tokens = 0

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion:
        request = json.dumps(
            {
                "backend": self.backend.name,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_logprobs": top_logprobs,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        key = hashlib.sha256(request.encode()).hexdigest()
        found = self.writer.cached_response(key)
        if found is not None:
            self.hits += 1
            return Completion(**json.loads(found))
        result = self.backend.complete(
            messages, max_tokens=max_tokens, temperature=temperature, top_logprobs=top_logprobs
        )
        self.misses += 1
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        self.writer.cache_response(key, request, json.dumps(asdict(result)))
        return result


def backend_from_config(
    kind: str | None = None,
    *,
    model: str | None = None,
    base_url: str | None = None,
    local: str | Path | None = None,
    api_key_env: str | None = None,
    env: dict[str, str] | None = None,
    **options: Any,
) -> Backend | None:
    """The backend asked for (``kind`` "openai", "local" or "baseline"/"none"), or, with ``kind=None``, the one
    the environment configures: ``INTERPLAB_LLM_LOCAL=<folder>`` (a `LocalBackend`), else
    ``INTERPLAB_LLM_BASE_URL`` and ``INTERPLAB_LLM_MODEL`` (an `OpenAIBackend` whose key is in
    ``INTERPLAB_LLM_API_KEY``, or in the variable ``api_key_env`` names). None when nothing is configured (the
    built-in baseline explainer runs). ``options`` go to the backend (timeout_s, requests_per_minute, ...)."""
    env = dict(os.environ) if env is None else env
    valid = ("openai", "local", "baseline", "none")
    if kind is not None and kind not in valid:
        raise ValueError(f"unknown backend {kind!r}; valid: {', '.join(valid)}")
    if kind in ("baseline", "none"):
        return None
    local = local or (env.get(ENV_LOCAL) if kind in (None, "local") and not base_url else None)
    if kind == "local" or (kind is None and local):
        if not local:
            raise LLMError(f"the local backend needs a model folder: --local PATH or {ENV_LOCAL}=PATH")
        return LocalBackend(local, **options)
    base_url = base_url or env.get(ENV_BASE_URL)
    model = model or env.get(ENV_MODEL)
    if kind is None and not base_url:
        return None
    if not base_url or not model:
        raise LLMError(
            f"the openai backend needs a base URL and a model: --base-url / {ENV_BASE_URL} and --model / "
            f"{ENV_MODEL} (got base URL {base_url!r}, model {model!r})"
        )
    return OpenAIBackend(base_url, model, api_key_env=api_key_env or ENV_API_KEY, **options)
