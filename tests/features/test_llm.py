"""LLM backends (`interplab.features.llm`) against the loopback test server and a tiny local causal LM."""

from __future__ import annotations

import time

import pytest
import torch

from interplab.features.llm import (
    CachedBackend,
    LLMError,
    LocalBackend,
    OpenAIBackend,
    backend_from_config,
)
from tests.features.llm_server import LLMServer

KEY_ENV = "INTERPLAB_TEST_LLM_KEY"
HI = [{"role": "user", "content": "say hello to the test"}]


@pytest.fixture(name="planted_db")
def planted_db_fixture(feature_db):
    """A feature database of the planted SAE whose feature j fires exactly on token j (4 features), on each
    backend (a SQLite file, a PostgreSQL URL)."""
    from interplab.features import FeatureBuildConfig
    from interplab.features.build import build_feature_db
    from tests.features.planted import planted_sae, tiny_model

    model = tiny_model()
    tokens = torch.randint(0, 40, (24, 16), generator=torch.Generator().manual_seed(1))
    path = feature_db("f.db")
    cfg = FeatureBuildConfig(top_k=4, n_samples=4, window_left=3, batch_size=8)
    build_feature_db(path, model, planted_sae(model, 4), tokens, cfg)
    return path


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    with LLMServer() as s:
        yield s


def backend(server, **kw) -> OpenAIBackend:
    kw.setdefault("api_key_env", KEY_ENV)
    kw.setdefault("backoff_s", 0.01)
    return OpenAIBackend(server.base_url, "test-model", **kw)


def test_a_chat_completion_and_what_was_sent(server):
    done = backend(server).complete(HI, max_tokens=7, temperature=0.5)
    assert done.text == "test the to hello say"  # the server's echo reply: the words reversed
    assert (done.prompt_tokens, done.completion_tokens, done.logprobs) == (5, 5, None)
    assert server.requests == [{"model": "test-model", "messages": HI, "max_tokens": 7, "temperature": 0.5}]
    assert server.headers[0]["Authorization"] == "Bearer test-key"
    assert backend(server).name == f"openai:test-model@{server.base_url.split('/')[2]}"


def test_top_logprobs_are_parsed_per_token(server):
    server.reply = lambda messages, body: ("a b", [{"a": -0.1, "x": -2.5, "y": -3.0}, {"b": -0.2, "z": -1.7}])
    done = backend(server).complete(HI, top_logprobs=2)
    assert server.requests[0]["logprobs"] is True and server.requests[0]["top_logprobs"] == 2
    assert done.logprobs == [{"a": -0.1, "x": -2.5}, {"b": -0.2, "z": -1.7}]


def test_429_waits_as_retry_after_says_then_succeeds(server):
    server.fail("429", "429")
    server.retry_after = "0.3"
    start = time.monotonic()
    done = backend(server, backoff_s=30.0).complete(HI)  # Retry-After, not the 30 s backoff, sets the wait
    elapsed = time.monotonic() - start
    assert done.text == "test the to hello say" and server.n_requests == 3
    assert 0.6 <= elapsed < 5.0


def test_429_forever_gives_up_naming_url_and_status(server):
    server.always = "429"
    with pytest.raises(LLMError, match=r"failed 3 times; last: HTTP 429 \(Rate limit reached\)") as err:
        backend(server, max_retries=2).complete(HI)
    assert server.base_url in str(err.value) and server.n_requests == 3


def test_5xx_is_retried(server):
    server.fail("500")
    assert backend(server).complete(HI).text and server.n_requests == 2


def test_a_hanging_server_times_out_then_the_retry_succeeds(server):
    server.hang_s = 1.5
    server.fail("hang")
    start = time.monotonic()
    assert backend(server, timeout_s=0.3, max_retries=1).complete(HI).text == "test the to hello say"
    assert server.n_requests == 2 and time.monotonic() - start < 1.4  # did not wait for the hang
    server.always = "hang"
    with pytest.raises(LLMError, match="no answer within 0.3 s"):
        backend(server, timeout_s=0.3, max_retries=0).complete(HI)


@pytest.mark.parametrize(
    ("mode", "shown"), [("malformed", "'{this is not json'"), ("no_choices", "KeyError: 'choices'")]
)
def test_a_malformed_reply_names_what_came_back_and_is_not_retried(server, mode, shown):
    server.always = mode
    with pytest.raises(LLMError, match="not a chat completion") as err:
        backend(server).complete(HI)
    assert shown in str(err.value) and server.n_requests == 1


def test_missing_or_wrong_key(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(LLMError, match=f"set the environment variable {KEY_ENV}"):
        backend(server).complete(HI)
    assert server.n_requests == 0  # nothing sent without a key
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(LLMError, match=f"refused the key in {KEY_ENV} \\(HTTP 401"):
        backend(server).complete(HI)
    assert server.n_requests == 1  # not retried


def test_logprobs_asked_but_not_given(server):
    server.reply = lambda m, b: "plain"
    orig = server._send

    def strip_logprobs(h, status, obj, headers=None):
        if isinstance(obj, dict) and "choices" in obj:
            obj["choices"][0].pop("logprobs", None)
        orig(h, status, obj, headers)

    server._send = strip_logprobs
    with pytest.raises(LLMError, match="returned no logprobs"):
        backend(server).complete(HI, top_logprobs=3)


def test_requests_per_minute_spaces_requests(server):
    b = backend(server, requests_per_minute=300)  # one every 0.2 s
    start = time.monotonic()
    for _ in range(3):
        b.complete(HI)
    assert time.monotonic() - start >= 0.4 - 1e-3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="http"):
        OpenAIBackend("localhost:8000", "m")
    with pytest.raises(ValueError, match="requests_per_minute"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", requests_per_minute=0)
    with pytest.raises(ValueError, match="role"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", api_key_env=None).complete([{"role": "x", "content": ""}])


def test_a_refused_connection_is_retried_then_named():
    b = OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key_env=None, max_retries=1, backoff_s=0.0)
    with pytest.raises(LLMError, match="cannot connect"):
        b.complete(HI)


def test_cached_backend_answers_reruns_from_the_database(server, planted_db):
    from interplab.features.writer import FeatureWriter

    with FeatureWriter(planted_db) as w:
        cached = CachedBackend(backend(server), w)
        first = cached.complete(HI)
        again = CachedBackend(backend(server), w).complete(HI)
        assert again == first and server.n_requests == 1
        CachedBackend(backend(server), w).complete(HI, max_tokens=9)  # other parameters: another request
        assert server.n_requests == 2
        assert (cached.hits, cached.misses, cached.prompt_tokens) == (0, 1, 5)
        server.reply = lambda m, b: ("x", [{"x": -0.5, "y": -1.0}])
        with_lp = cached.complete(HI, top_logprobs=2)
        assert CachedBackend(backend(server), w).complete(HI, top_logprobs=2) == with_lp
        assert with_lp.logprobs == [{"x": -0.5, "y": -1.0}] and server.n_requests == 3


def test_backend_from_config(tmp_path):
    assert backend_from_config(env={}) is None
    assert backend_from_config("baseline", env={"INTERPLAB_LLM_BASE_URL": "http://h/v1"}) is None
    b = backend_from_config(env={"INTERPLAB_LLM_BASE_URL": "http://h:1/v1", "INTERPLAB_LLM_MODEL": "m"})
    assert (
        isinstance(b, OpenAIBackend) and b.name == "openai:m@h:1" and b.api_key_env == "INTERPLAB_LLM_API_KEY"
    )
    b = backend_from_config("openai", base_url="http://h/v1", model="m", api_key_env="K", env={}, timeout_s=3)
    assert isinstance(b, OpenAIBackend) and (b.api_key_env, b.timeout_s) == ("K", 3)
    with pytest.raises(LLMError, match="INTERPLAB_LLM_MODEL"):
        backend_from_config("openai", base_url="http://h/v1", env={})
    with pytest.raises(LLMError, match="not a Hugging Face model folder"):
        backend_from_config(env={"INTERPLAB_LLM_LOCAL": str(tmp_path)})
    with pytest.raises(ValueError, match="valid: openai, local, baseline, none"):
        backend_from_config("anthropic")


# ---- the local backend: a tiny randomly initialised causal LM saved to a folder (nothing downloaded) --------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<eos>", "user", "system", "assistant", ":", "say", "hello", "to", "the", "test", "fires", "on"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"<unk>": len(words)}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(words) + 1,
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    path = tmp_path_factory.mktemp("lm") / "tiny-gpt2"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _greedy_reference(path, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by full recomputation at every step (no KV cache): the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out, lps = [], []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids + out])).logits[0, -1].float(), -1)
            lps.append(lp)
            nxt = int(lp.argmax())
            if nxt == 0:
                break
            out.append(nxt)
    return out, lps


def test_local_backend_generates_greedily_with_logprobs(tiny_lm):
    b = LocalBackend(tiny_lm)
    assert b.name == "local:tiny-gpt2"
    done = b.complete(HI, max_tokens=6, top_logprobs=3)
    ids = b.tokenizer("user: say hello to the test\n\nassistant:")["input_ids"]
    assert b._prompt_ids(HI) == ids  # no chat template: role-prefixed plain text
    ref, lps = _greedy_reference(tiny_lm, ids, 6)
    assert done.prompt_tokens == len(ids) and done.completion_tokens == len(ref)
    assert done.text == b.tokenizer.decode(ref, skip_special_tokens=True)
    assert done.logprobs is not None and len(done.logprobs) == len(lps)
    for got, lp in zip(done.logprobs, lps, strict=True):
        vals, idx = lp.topk(3)
        want = {b.tokenizer.decode([int(i)]): float(v) for v, i in zip(vals, idx, strict=True)}
        torch.testing.assert_close(
            torch.tensor([got[t] for t in want]), torch.tensor(list(want.values())), rtol=1e-4, atol=1e-5
        )
        assert next(iter(got)) == b.tokenizer.decode([int(lp.argmax())])  # the generated token first
    assert b.complete(HI, max_tokens=6).logprobs is None


def test_local_backend_uses_the_chat_template(tiny_lm, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "chat"
    shutil.copytree(tiny_lm, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    tok.save_pretrained(path)
    b = LocalBackend(path)
    assert b._prompt_ids(HI) == b.tokenizer("user : say hello to the test assistant :")["input_ids"]
    assert b.complete(HI, max_tokens=3).prompt_tokens == 9  # user : say hello to the test assistant :
