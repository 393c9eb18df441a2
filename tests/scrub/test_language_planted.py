"""The new parts of the hypothesis language on a hand-built model whose circuit is known by construction:
the true position-resolved, node-level and rewrite hypotheses recover >= 95%; a hypothesis claiming the wrong
position, separate samples where one shared sample is needed, or a wrong rewrite recovers clearly less.

The model ("same first and last token"): one layer, no norms, residual subspaces TOK (the token), POS (the
position), COPY and OUT. Head a0.0 attends from every position to position 0 (its key reads POS only, weight
>= 0.9999) and copies that token into COPY; a0.1 writes nothing. The MLP has one ReLU unit per token k,
``relu(TOK_k + COPY_k - 1)``: it fires only when the current token and the copied first token are both k, and
writes into OUT, which the unembedding reads. The loss is the cross-entropy at the last position against
"the last token equals the first". So the answer reads the embedding at the last position directly and at
position 0 through a0.0, and those two must come from one input."""

import pytest
import torch

from interplab.model.config import ModelConfig, Norm
from interplab.model.transformer import Transformer
from interplab.scrub import Claim, Hypothesis, Rewrite, ScrubConfig, ScrubTask, anything, feature, scrub

V, T = 8, 8
TOK, POS, COPY, OUT = 0, V, V + T, V + T + V
CFG = ScrubConfig(n_examples=600, n_seeds=2, per_claim=False, batch_size=300)


def planted_same_first_last(sharpness: float = 12.0, scale: float = 16.0) -> Transformer:
    cfg = ModelConfig(
        d_model=OUT + 1,
        n_layers=1,
        n_heads=2,
        d_head=V,
        d_mlp=V,
        d_vocab=V,
        d_vocab_out=2,
        n_ctx=T,
        act_fn="relu",
        normalization=Norm.NONE,
        attn_scale=1.0,
        unembed_bias=True,
        name="planted-same-first-last",
    )
    model = Transformer(cfg, init=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:, TOK : TOK + V] = torch.eye(V)
        model.pos_embed.W_pos[:, POS : POS + T] = torch.eye(T)
        attn = model.blocks[0].attn
        attn.W_Q[0, POS : POS + T, 0] = 1.0  # every query asks for ...
        attn.W_K[0, POS, 0] = sharpness  # ... the key at position 0
        attn.W_V[0, TOK : TOK + V, :V] = torch.eye(V)
        attn.W_O[0, :V, COPY : COPY + V] = torch.eye(V)
        mlp = model.blocks[0].mlp
        mlp.W_in[TOK : TOK + V] = torch.eye(V)
        mlp.W_in[COPY : COPY + V] = torch.eye(V)
        mlp.b_in[:] = -1.0
        mlp.W_out[:, OUT] = 1.0
        model.unembed.W_U[OUT, 1] = scale
        model.unembed.b_U[:] = torch.tensor([0.0, -scale / 2])
    return model.eval()


def same_task(n: int = 3000, seed: int = 0) -> ScrubTask:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (n, T), generator=gen)
    same = torch.rand(n, generator=gen) < 0.5
    shift = torch.randint(1, V, (n,), generator=gen)
    tokens[:, -1] = torch.where(same, tokens[:, 0], (tokens[:, 0] + shift) % V)
    labels = (tokens[:, -1] == tokens[:, 0]).long()

    def loss(logits, rows):
        return torch.nn.functional.cross_entropy(logits[:, -1].float(), labels[rows], reduction="none")

    return ScrubTask(name="same first and last", tokens=tokens, loss=loss)


@feature
def is_same(tokens):
    return tokens[:, -1] == tokens[:, 0]


@feature
def first_token(tokens):
    return tokens[:, 0]


@feature
def last_token(tokens):
    return tokens[:, -1]


@feature(per_position=True)
def token_at(tokens):
    return tokens


@feature(per_position=True)
def next_token_at(tokens):
    return torch.roll(tokens, -1, dims=1)


@pytest.fixture(scope="module")
def setup():
    return planted_same_first_last(), same_task()


def recovered(setup, *children, name="h"):
    model, task = setup
    result = scrub(
        model,
        task,
        Hypothesis(Claim("logits", children=[Claim("m0", is_same, children=list(children))]), name),
        CFG,
    )
    return result


def test_the_planted_model_does_what_it_says(setup):
    r = recovered(setup)  # m0 a leaf on an input with the same answer: everything
    assert r.loss_original.mean < 0.01
    assert 3.0 < r.loss_random.mean < 5.0
    assert r.recovered.mean >= 0.99


def _position_claim(position):
    """The last token directly, and a0.0's input at ``position`` agreeing on the first token."""
    head = Claim("a0.0", first_token, children=[Claim("a0.0.in", first_token, positions=position)])
    return [Claim("embed@-1", last_token), head]


def test_the_true_position_resolved_hypothesis_recovers_it_the_wrong_position_does_not(setup):
    assert recovered(setup, *_position_claim(0)).recovered.mean >= 0.95
    # position 0 from a random input: the copied token is right with p = 1/8
    assert recovered(setup, *_position_claim(1)).recovered.mean < 0.6


def test_per_position_claims_recover_it_and_a_shifted_feature_does_not(setup):
    good = recovered(
        setup, Claim("embed@-1", last_token), Claim("a0.0", children=[Claim("a0.0.in@[0..7]", token_at)])
    )
    assert good.recovered.mean >= 0.95
    assert "logits/m0/a0.0/a0.0.in@0" in good.samples[0]
    shifted = recovered(
        setup, Claim("embed@-1", last_token), Claim("a0.0", children=[Claim("a0.0.in@[0..7]", next_token_at)])
    )
    assert shifted.recovered.mean < 0.6


def test_one_shared_sample_on_every_path_recovers_it_separate_samples_do_not(setup):
    shared = recovered(setup, Claim("embed", is_same, paths="all"))
    assert shared.recovered.mean >= 0.95
    # each path its own input with the right answer: the last token and the copied first token disagree
    separate = recovered(setup, Claim("embed", is_same), Claim("a0.0", is_same))
    assert separate.recovered.mean < 0.8
    assert shared.recovered.mean - separate.recovered.mean > 0.2
    # `anything`: one random input on every path, agreeing on nothing: the random baseline's level
    unconditional = recovered(setup, Claim("embed", anything, paths="all"))
    assert abs(unconditional.recovered.mean) < 0.1


def _copy_first(value, tokens):
    out = torch.zeros_like(value)
    out[:, :, COPY : COPY + V] = torch.nn.functional.one_hot(tokens[:, 0], V).to(value.dtype)[:, None]
    return out


def test_the_true_rewrite_recovers_it_a_wrong_one_does_not(setup):
    true = Rewrite(parts={"copy": _copy_first})
    r = recovered(
        setup,
        Claim("embed@-1", last_token),
        Claim("a0.0", first_token, rewrite=true, children=[Claim("a0.0:copy", first_token)]),
    )
    assert r.recovered.mean >= 0.95
    # the projection on the mean COPY direction carries no token: the token is in the random residual
    flat = torch.zeros(OUT + 1)
    flat[COPY : COPY + V] = 1.0
    wrong = Rewrite.projection(flat)
    w = recovered(
        setup,
        Claim("embed@-1", last_token),
        Claim("a0.0", first_token, rewrite=wrong, children=[Claim("a0.0:projection", first_token)]),
    )
    assert w.recovered.mean < 0.6


def test_the_samples_name_every_claim_and_agree_on_its_feature(setup):
    model, task = setup
    h = Hypothesis(
        Claim("logits", children=[Claim("m0", is_same, children=[Claim("embed", is_same, paths="all")])])
    )
    r = scrub(model, task, h, ScrubConfig(n_examples=20, n_seeds=1, per_claim=False, n_show=3))
    assert len(r.samples) == 3
    for row in r.samples:
        assert set(row) == {"logits", "logits (others)", "logits/m0", "logits/m0 (others)", "logits/m0/embed"}
        same = is_same(task.tokens)
        assert same[row["logits/m0/embed"]] == same[row["logits"]]
