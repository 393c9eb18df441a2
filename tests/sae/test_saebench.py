"""`interplab.sae.saebench` without the peer (tests/sae/test_bench_core_peer.py compares it with SAEBench):
its token set, its refusals and its plug-in for `bench_saes`."""

import pytest
import torch
from torch.testing import assert_close

from interplab.data import CharTokenizer
from interplab.sae import create_sae
from interplab.sae.config import SAEConfig
from interplab.sae.saebench import SAEBENCH_CORE, saebench_core, saebench_ignore_tokens, saebench_metric

HOOK = "blocks.0.hook_resid_post"


def test_ignored_tokens_leave_every_metric(tiny_model):
    sae = create_sae(SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name=HOOK), seed=0)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(2, 50, (4, 12), generator=g)
    flagged = toks.clone()
    flagged[:, 5] = 1  # the same rows with one position turned into an ignored token
    base = saebench_core(tiny_model, sae, [toks], ignore_tokens=())
    ignored = saebench_core(tiny_model, sae, [flagged], ignore_tokens={1})
    assert set(base) == set(SAEBENCH_CORE)
    # L0 over the kept positions only, recomputed directly
    _, cache = tiny_model.run_with_cache(flagged, names=[HOOK])
    acts = sae.encode(cache[HOOK])
    keep = flagged != 1
    assert_close(ignored["l0"], float((acts[keep] != 0).float().sum(-1).mean()))
    assert base["l0"] != pytest.approx(ignored["l0"])
    with pytest.raises(ValueError, match="every position holds an ignored token"):
        saebench_core(tiny_model, sae, [torch.ones(2, 6, dtype=torch.long)], ignore_tokens={1})


def test_refuses_a_transcoder(tiny_model):
    tc = create_sae(SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name="blocks.0.ln2.hook_normalized",
                              hook_name_out="blocks.0.hook_mlp_out"))  # fmt: skip
    with pytest.raises(ValueError, match="transcoder"):
        saebench_core(tiny_model, tc, [torch.randint(0, 50, (2, 8))])


def test_metric_plugin_and_ignore_tokens(tiny_model):
    tok = CharTokenizer("abc")
    assert saebench_ignore_tokens(tok) == {tok.bos_id, tok.pad_id}
    assert saebench_ignore_tokens(None) == set()
    sae = create_sae(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=3, hook_name=HOOK))
    batches = [torch.randint(2, 50, (2, 10), generator=torch.Generator().manual_seed(1))]
    got = saebench_metric(tiny_model, batches, {1})("x", sae)
    assert got == {
        f"saebench_{k}": v for k, v in saebench_core(tiny_model, sae, batches, ignore_tokens={1}).items()
    }
    assert got["saebench_l0"] == 3
