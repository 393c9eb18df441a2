"""Scrub reports: the sampled inputs per claim (text and HTML), report.json, positioned claim names in the
per-claim and per-class breakdowns, one plotly.js per run, and one folder per hypothesis."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from interplab.cli.main import app
from interplab.cli.scrub import hypothesis_folders
from interplab.plots import PLOTLY_JS
from interplab.scrub.estimate import Estimate
from interplab.scrub.parens import paren_string, tokenize
from interplab.scrub.result import PALETTE, ClaimRow, ScrubResult, sample_inputs, sample_lines

E = Estimate(0.5, 0.02, 0.46, 0.54, 0.49, 0.51)
R = Estimate(0.88, 0.01, 0.86, 0.9, 0.875, 0.885)

# one reference as the compiler records it: claim paths (as in error messages) -> data-set rows; an internal
# claim's other-inputs datum under "<path> (others)"; a2.1's input claimed at two positions
SAMPLE = {
    "logits": 7,
    "logits (others)": 40,
    "logits/a1.0": 12,
    "logits/a1.0 (others)": 40,
    "logits/a1.0/a1.0.in@1": 7,
    "logits/a2.1": 3,
    "logits/a2.1 (others)": 55,
    "logits/a2.1/a2.1.in@3": 3,
    "logits/a2.1/a2.1.in@[5..40]": 91,
    "logits/a2.1/a2.1.mask": 12,
}


def result(**kw) -> ScrubResult:
    base = dict(
        hypothesis="3a",
        description="logits\n  a2.1 [horizon_all]",
        task="paren-balancer",
        n_examples=4000,
        n_seeds=2,
        loss_original=E,
        loss_random=E,
        loss_scrubbed=E,
        recovered=R,
    )
    return ScrubResult(**{**base, **kw})


def test_sample_lines_are_the_claim_tree_with_one_letter_per_distinct_row():
    lines = sample_lines(SAMPLE)
    got = [(ln.depth, ln.label, ln.row, ln.letter) for ln in lines]
    assert got == [
        (0, "logits", 7, "A"),
        (1, "(others)", 40, "B"),
        (1, "a1.0", 12, "C"),
        (2, "(others)", 40, "B"),  # the same row as the root's others: the same letter
        (2, "a1.0.in@1", 7, "A"),  # the reference itself
        (1, "a2.1", 3, "D"),
        (2, "(others)", 55, "E"),
        (2, "a2.1.in@3", 3, "D"),
        (2, "a2.1.in@[5..40]", 91, "F"),
        (2, "a2.1.mask", 12, "C"),
    ]
    # the order of the keys does not matter: children hang under their parent, others under their claim
    shuffled = dict(reversed(list(SAMPLE.items())))
    assert [(ln.key, ln.depth) for ln in sample_lines(shuffled)][0] == ("logits", 0)
    assert {(ln.key, ln.depth) for ln in sample_lines(shuffled)} == {(ln.key, ln.depth) for ln in lines}
    # a claim whose parent is not recorded hangs under the nearest recorded ancestor
    assert [(ln.label, ln.depth) for ln in sample_lines({"logits": 1, "logits/a1.0/a1.0.q": 2})] == [
        ("logits", 0),
        ("a1.0.q", 1),
    ]


def test_sampled_inputs_in_text_html_and_report_json(tmp_path):
    strings = ["()" * (i % 5 + 1) for i in range(100)]
    strings[91] = ""
    tokens = tokenize(["(())", *strings[1:]])
    inputs = sample_inputs([SAMPLE], tokens, paren_string, (tokens != 1).long())
    assert sorted(inputs) == [3, 7, 12, 40, 55, 91]
    assert inputs[7] == paren_string(tokens[7]) == strings[7] and inputs[91] == ""
    # without a decode: the token ids of the real positions
    ids = sample_inputs([{"logits": 0}], tokens, None, (tokens != 1).long())
    assert ids == {0: "0 3 3 4 4 2"}
    r = result(samples=[SAMPLE], inputs={**inputs, 91: "<b>&"})  # a decode may return anything
    text = str(r)
    assert "sampled inputs, first 1 of 1 recorded references of seed 0" in text
    row_a = next(line for line in text.splitlines() if "a1.0.in@1" in line)
    assert re.search(r"\bA\s+a1\.0\.in@1\s+row 7\s+\(\)\(\)\(\)$", row_a), row_a
    page = r.to_html(tmp_path)
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page
    colours = dict(re.findall(r'<tr style="background:(#[0-9a-f]{6})" data-row="(\d+)"', page))
    by_row: dict[str, set[str]] = {}
    for colour, row in re.findall(r'<tr style="background:(#[0-9a-f]{6})" data-row="(\d+)"', page):
        by_row.setdefault(row, set()).add(colour)
    assert all(len(c) == 1 for c in by_row.values()) and len(by_row) == 6  # one colour per row
    assert len({next(iter(c)) for c in by_row.values()}) == 6 and set(colours) <= set(PALETTE)
    r.save(tmp_path / "h")
    data = json.loads((tmp_path / "h" / "report.json").read_text())
    assert data["samples"] == [SAMPLE] and data["inputs"]["91"] == "<b>&"
    assert data["recovered"] == {
        "mean": 0.88,
        "se": 0.01,
        "ci_low": 0.86,
        "ci_high": 0.9,
        "seeds_low": 0.875,
        "seeds_high": 0.885,
    }
    assert "no sampled inputs recorded" in result().samples_text()
    two = result(samples=[SAMPLE, {"logits": 3}], inputs=inputs)
    assert two.table(n_samples=None).count("reference ") == 2 and str(two).count("reference ") == 1
    assert "sampled inputs" not in two.table(n_samples=0)


def test_positioned_claims_and_classes_render(tmp_path):
    names = [
        "logits/a2.1/a2.1.in@3",
        "logits/a2.1/a2.1.in@[0..41]",
        "logits/a1.0/a1.0.in@1/embed",
        "logits/a0.0:phi",
        "logits/a2.1/a2.1.in@3",  # a per-position claim replicated: the same path twice
    ]
    per_class = {"balanced <1>": {"n": 3, "original": E, "random": E, "scrubbed": E}}
    r = result(per_claim=[ClaimRow(n, E, R) for n in names], per_class=per_class)
    for name in names:
        assert name in r.table()
    assert "balanced <1>" in r.table()
    fig = r.plot()
    x = list(fig.data[0].x)
    assert len(x) == 3 + len(names) and len(set(x)) == len(x)  # repeated paths stay separate bars
    assert [s.replace("\u200b", "") for s in x[3:]] == names
    assert "88.0% [86.0%, 90.0%]" in r.table()
    page = r.to_html(tmp_path)
    assert all(name in page for name in names) and "balanced &lt;1&gt;" in page


def test_positioned_claim_html_is_escaped(tmp_path):
    r = result(per_claim=[ClaimRow("logits/a2.1/a2.1.in@[0..41]<i>", E, R)])
    page = r.to_html(tmp_path)
    assert "a2.1.in@[0..41]&lt;i&gt;" in page and "[0..41]<i>" not in page.split("<h2>Chart")[0]


def test_hypothesis_folders_are_distinct_and_stable():
    names = [
        "1a",
        "a b",
        "a/b",
        "a-b",
        "..",
        ".",
        "config.json",
        "A",
        "a",
        "x" * 80,
        "x" * 81,
        "plain_name.v2",
    ]
    folders = hypothesis_folders(names)
    assert len({f.casefold() for f in folders}) == len(names)
    assert folders[0] == "1a" and folders[3] == "a-b" and folders[-1] == "plain_name.v2"  # plain names stay
    for f in folders:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", f) and len(f) <= 69, f
        assert f.casefold() not in ("config.json", "log.jsonl", PLOTLY_JS)
    assert hypothesis_folders(["a b"]) == [folders[1]] == [hypothesis_folders(["z", "a b"])[1]]  # stable
    with pytest.raises(ValueError, match=r"2 hypotheses are named '1a'"):
        hypothesis_folders(["1a", "b", "1a"])


def test_scrub_run_with_names_that_share_a_slug(tmp_path):
    hyp = tmp_path / "h.py"
    hyp.write_text(
        "from dataclasses import replace\n"
        "from interplab.scrub.induction import induction_steps\n"
        "h = induction_steps()[-1]\n"
        "hypotheses = [replace(h, name='step 4'), replace(h, name='step/4'), replace(h, name='step-4')]\n"
    )
    out = tmp_path / "run"
    args = ["scrub", str(hyp), "--model", "planted-induction", "--task", "induction", "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--n-examples", "100", "--seeds", "1", "--no-per-claim"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["hypothesis"] for e in log] == ["step 4", "step/4", "step-4"]
    assert len({e["folder"] for e in log}) == 3 and log[2]["folder"] == "step-4"
    for e in log:
        report = json.loads((out / e["folder"] / "report.json").read_text())
        assert report["hypothesis"] == e["hypothesis"]
        page = (out / e["folder"] / "report.html").read_text()
        assert f'<script charset="utf-8" src="../{PLOTLY_JS}"></script>' in page
    # one plotly.js for the whole run, beside config.json: none in the hypothesis folders
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob(PLOTLY_JS)) == [PLOTLY_JS]
    assert (out / PLOTLY_JS).stat().st_size > 1_000_000


def test_sample_inputs_of_an_empty_record():
    assert sample_inputs([], torch.zeros(2, 3, dtype=torch.long)) == {}


def test_a_scrub_records_and_renders_the_inputs_of_its_first_references(tmp_path):
    from interplab.circuits.planted import induction_data, planted_induction
    from interplab.scrub import ScrubConfig, scrub
    from interplab.scrub.induction import induction_steps, induction_task
    from interplab.scrub.result import OTHERS

    tokens, _, _ = induction_data(400)
    hypothesis = induction_steps()[-1]
    config = ScrubConfig(n_examples=100, n_seeds=1, per_claim=False, n_show=3)
    r = scrub(planted_induction(), induction_task(tokens), hypothesis, config)
    assert len(r.samples) == 3
    paths = {"/".join(p) for p, _ in hypothesis.claims()}
    internal = {"/".join(p) + OTHERS for p, c in hypothesis.claims() if not c.leaf}
    for sample in r.samples:
        assert set(sample) == paths | internal
    rows = {row for sample in r.samples for row in sample.values()}
    assert set(r.inputs) == rows  # no decode: the token ids
    assert all(r.inputs[row] == " ".join(str(t) for t in tokens[row].tolist()) for row in rows)
    text = r.samples_text()
    assert text.count("reference ") == 3 and text.count("row ") == 3 * len(paths | internal)
    r.save(tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["samples"] == r.samples
    assert (
        scrub(planted_induction(), induction_task(tokens), hypothesis, replace(config, n_show=0)).samples
        == []
    )
