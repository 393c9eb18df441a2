import pytest

from interplab.hooks import Site, SiteKind
from interplab.hooks.site import suggest


@pytest.mark.parametrize("kind", list(SiteKind))
def test_every_kind_round_trips_through_each_form(kind):
    layer = 3 if kind.per_layer else None
    site = Site(kind, layer)
    assert Site.parse(site.name) == site
    assert Site.parse(str(site)) == site
    assert Site.parse(site) is site
    assert Site.parse(kind.short, layer) == site
    assert Site.parse((kind.short, layer)) == site
    assert Site.parse(kind.value, layer) == site
    expected = f"blocks.3.{kind.value}" if kind.per_layer else kind.value
    assert site.name == expected


def test_short_names_are_unique_and_transformerlens_aliases_work():
    shorts = [k.short for k in SiteKind]
    assert len(set(shorts)) == len(shorts)
    assert Site.parse("attn", 2) == Site(SiteKind.PATTERN, 2)
    assert Site.parse("scores", 2) == Site(SiteKind.ATTN_SCORES, 2)
    assert Site.parse("mlp_post", 0) == Site.parse("blocks.0.mlp.hook_post")
    assert Site.parse("scale") == Site(SiteKind.LN_FINAL_SCALE)
    assert Site.parse(("ln1_scale", 1)).name == "blocks.1.ln1.hook_scale"


def test_sites_sort_and_hash():
    sites = {Site.parse(("z", 1)), Site.parse("blocks.1.attn.hook_z"), Site.parse(("z", 0))}
    assert len(sites) == 2
    assert sorted(sites)[0].layer == 0


@pytest.mark.parametrize(
    ("value", "layer", "message"),
    [
        (
            "blocks.0.hook_resid_psot",
            None,
            r"unknown site 'blocks\.0\.hook_resid_psot'; did you mean .*hook_resid_post",
        ),
        ("resid_pots", 1, r"unknown site 'resid_pots'.*resid_post"),
        ("resid_pre", None, r"'resid_pre' is per layer: give a layer, e.g. \('resid_pre', 0\)"),
        ("hook_embed", 2, r"'hook_embed' \(hook_embed\) has no layer, got layer=2"),
        ("blocks.1.hook_embed", None, r"unknown site 'blocks\.1\.hook_embed'"),
        ("blocks.1.hook_z", 2, r"unknown site"),
        ("blocks.1.attn.hook_z", 2, r"already names layer 1, got layer=2"),
        (("z", 1, 2), None, r"a site tuple is \(name, layer\)"),
        ("z", -1, r"non-negative int, got -1"),
    ],
)
def test_parse_errors_name_the_bad_value(value, layer, message):
    with pytest.raises(ValueError, match=message):
        Site.parse(value, layer)


def test_constructor_validation():
    with pytest.raises(ValueError, match="per layer"):
        Site(SiteKind.Z)
    with pytest.raises(ValueError, match="has no layer"):
        Site(SiteKind.EMBED, 0)
    assert Site("attn.hook_z", 0).kind is SiteKind.Z
    with pytest.raises(TypeError, match="got int"):
        Site.parse(3)


def test_suggest():
    assert (
        suggest("blocks.0.hook_resid_pos", ["blocks.0.hook_resid_post", "hook_embed"])[0]
        == "blocks.0.hook_resid_post"
    )
