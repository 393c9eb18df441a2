"""Graphs across checkpoints: a planted pair of checkpoints whose only difference is the copying head's value
path (so exactly the planted path appears), features followed across CLTs whose latents are permuted."""

from __future__ import annotations

import pytest
import torch

from interplab.graphs import GraphsAcross, attribute, compare_graphs, match_features, prune_graph
from tests.graphs.planted import BOS, A, B, C, D, exact_transcoder, planted_model

TOKENS = [BOS, A, D, C]


def _checkpoints():
    """(before, after): the planted model with a bigram path C -> B, before without the head's value path."""
    after = planted_model()
    with torch.no_grad():
        after.unembed.W_U[:, B] += torch.eye(8)[2]  # the logit of B also reads C's embedding (e2)
    before = planted_model()
    with torch.no_grad():
        before.unembed.W_U.copy_(after.unembed.W_U)
        before.blocks[1].attn.W_V.zero_()
    return before, after


def _permuted(clt, perms):
    """The same transcoder with each layer's latents reordered: latent j of layer l is old latent perms[l][j]."""
    with torch.no_grad():
        for layer, perm in enumerate(perms):
            clt.W_enc[layer] = clt.W_enc[layer][:, perm]
            clt.b_enc[layer] = clt.b_enc[layer][perm]
            clt.W_dec[layer].copy_(clt.W_dec[layer][perm])
    return clt


def _compare():
    before, after = _checkpoints()
    perms = [torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])]  # old latent 0 is now 1 (layer 0), 3
    clts = [exact_transcoder(before), _permuted(exact_transcoder(after), perms)]
    graphs = [attribute(m, c, TOKENS, targets=[B]) for m, c in zip((before, after), clts, strict=True)]
    pruned = [prune_graph(g) for g in graphs]
    return compare_graphs([10, 20], graphs, pruned, clts), graphs


def test_planted_edges_appear_with_stable_identities():
    across, graphs = _compare()
    changes = across.changes_between(10, 20)
    nodes = {c.identity for c in changes if c.what == "node" and c.change == "appeared"}
    # the features are named by their track: latent 0 of step 10's CLT, though latents 1 and 3 at step 20
    assert nodes == {"0_0@10_1", "1_0@10_3"}
    edges = {c.identity: c for c in changes if c.what == "edge"}
    appeared = {k for k, c in edges.items() if c.change == "appeared"}
    assert appeared == {"E_1_1 -> 0_0@10_1", "0_0@10_1 -> 1_0@10_3", "1_0@10_3 -> 3_4_3"}
    assert not [c for c in changes if c.change == "vanished"]
    p = torch.exp(torch.tensor(8.0)) / (torch.exp(torch.tensor(8.0)) + 3)
    torch.testing.assert_close(edges["0_0@10_1 -> 1_0@10_3"].weight_after, float(p), rtol=1e-5, atol=1e-6)
    bigram = edges["E_2_3 -> 3_4_3"]  # kept at both steps: the direct effect of C on B's demeaned logit
    assert bigram.change == "changed"
    torch.testing.assert_close(bigram.weight_before, 5 / 6, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bigram.weight_after, 5 / 6, rtol=1e-5, atol=1e-6)
    assert across.counts == [
        {
            "nodes_appeared": 2,
            "nodes_vanished": 0,
            "edges_appeared": 3,
            "edges_vanished": 0,
            "features_matched": 2,
        }
    ]
    # before the head copies, all of the influence enters at C's position; after, some at A's
    first, second = across.graphs
    assert first.position_influence[3] == pytest.approx(1.0)
    assert second.position_influence[1] > 0.2
    assert graphs[1].nodes[graphs[1].feature_index(0, 1, 1)].feature == 1  # the permuted index in its graph


def test_match_features_mutual_best_over_threshold():
    _, after = _checkpoints()
    clt = exact_transcoder(after)
    perm = [torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])]
    maps = match_features(clt, _permuted(exact_transcoder(after), perm))
    # only latent 0 of each layer has a decoder (the others write nothing): it is found where it moved
    assert [m.tolist() for m in maps] == [[-1, 0, -1, -1], [-1, -1, -1, 0]]
    with pytest.raises(ValueError, match="cosine in"):
        match_features(clt, clt, threshold=2.0)


def test_save_load_exact_and_refusals(tmp_path):
    across, graphs = _compare()
    paths = across.save(tmp_path / "across")
    again = GraphsAcross.load(tmp_path / "across")
    assert again.to_dict() == across.to_dict()
    assert "| 20 |" in (tmp_path / "across" / "across.md").read_text()
    assert paths["html"]
    clt = exact_transcoder(planted_model())
    pruned = prune_graph(graphs[0])
    with pytest.raises(ValueError, match="increasing"):
        compare_graphs([20, 10], graphs, [pruned, pruned], [clt, clt])
    other = attribute(planted_model(), clt, [BOS, A, C], targets=[B])
    with pytest.raises(ValueError, match="another prompt"):
        compare_graphs([1, 2], [graphs[0], other], [pruned, prune_graph(other)], [clt, clt])


def test_qk_attribution_across_checkpoints_names_the_previous_token_key():
    """Two checkpoints of the smeared planted model (`test_qk`) whose query reads A: before, the head's key reads
    nothing; after, it reads layer 0's feature of A through the smear. On the induction edge (the repeated A at
    3 against D at 2, after the first A) the score goes from 0 to 8 x 3/4, all of it token A x that feature
    (named by its track across the permuted CLT) through the previous position's key."""
    from interplab.graphs.across import induction_edge
    from interplab.graphs.qk import qk_attribution
    from tests.graphs.test_qk import GATE, smeared_planted_model

    tokens = [BOS, A, D, A]
    assert induction_edge(tokens) == (3, 2)
    models = []
    for with_key in (False, True):
        m = smeared_planted_model()
        with torch.no_grad():
            m.blocks[1].attn.W_Q[0] = 4.0 * torch.outer(torch.eye(8)[0], torch.eye(8)[0])  # the query reads A
            if not with_key:
                m.blocks[1].attn.W_K.zero_()
        models.append(m)
    perms = [torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])]
    clts = [exact_transcoder(models[0]), _permuted(exact_transcoder(models[1]), perms)]
    graphs = [attribute(m, c, tokens, targets=[B]) for m, c in zip(models, clts, strict=True)]
    qks = [
        qk_attribution(m, c, tokens, layer=1, head=0, query_pos=3, key_pos=2, graph=g)
        for m, c, g in zip(models, clts, graphs, strict=True)
    ]
    across = compare_graphs([10, 20], graphs, [prune_graph(g) for g in graphs], clts, qks=qks)
    before, after = (g.qk for g in across.graphs)
    assert before is not None and after is not None
    assert before["score"] == pytest.approx(0.0, abs=1e-6) and before["by_kind"] == {}
    assert after["score"] == pytest.approx(8.0 * (1 - GATE), abs=1e-5)
    assert after["through_previous"] == pytest.approx(6.0, abs=1e-5)
    top = after["top"][0]
    assert (top["query"], top["key"], top["through"]) == (f"E_{A}_3", "0_0@10_1", 1)
    assert top["part"] == pytest.approx(6.0, abs=1e-5)
    assert "previous position's key" in top["label"] and "layer 0 feature 1 at 1" in top["label"]
    assert after["by_kind"] == {"token x feature, previous": pytest.approx(6.0, abs=1e-5)}
    assert "| QK score | through previous | top QK pair |" in across.markdown()
    assert f"E_{A}_3 x 0_0@10_1 (prev): +6.000" in across.markdown()
    assert "QK score" in {t.name for t in across.plot().data}
    assert GraphsAcross.from_dict(across.to_dict()).graphs[1].qk == after
    with pytest.raises(ValueError, match="one QK attribution per step"):
        compare_graphs([10, 20], graphs, [prune_graph(g) for g in graphs], clts, qks=qks[:1])
    with pytest.raises(ValueError, match="does not occur earlier"):
        induction_edge([BOS, A, D, C])
