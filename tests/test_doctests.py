"""Every docstring example (``>>>``) in interplab runs and is true.

The examples of one docstring run together, in a fresh temporary folder (so ``save("out.html")`` writes
there), with the module's globals plus the shared namespace of `tests.doctest_namespace` (a tiny model,
tokens, an SAE, a tiny training run ...: the names the examples use without defining them). An example
that truly needs what a CPU machine without network lacks is marked ``# doctest: +SKIP`` with the reason
on the same line; this test counts them and keeps them to the allow-list below.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re

import pytest

import interplab
from tests.doctest_namespace import DoctestNamespace

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# docstring -> why its examples cannot run in the test suite (the examples there carry the same reason)
SKIPS: dict[str, str] = {
    "interplab.web.app": "uvicorn.run serves until it is stopped",
    "interplab.sae.diffing": "trains a crosscoder on two checkpoints of the demo run (minutes); tests/sae/test_diffing.py runs it on a tiny run",
    "interplab.features.llm": "a completion needs an OpenAI-compatible server (tests/features/llm_server.py serves one)",
}


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(interplab.__path__, "interplab."):
        if info.name.endswith("__main__"):  # importing it runs the CLI
            continue
        names.append(info.name)
    return sorted(names)


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in ["interplab", *_modules()]:
        module = importlib.import_module(name)
        tests += [t for t in finder.find(module) if t.examples and t.name.startswith(name)]
    return tests


DOCTESTS = _doctests()


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_examples(test: doctest.DocTest, tmp_path, monkeypatch, doctest_ns: DoctestNamespace):
    monkeypatch.chdir(tmp_path)
    skipped = [ex for ex in test.examples if ex.options.get(doctest.SKIP)]
    if skipped:
        assert test.name in SKIPS, (
            f"{test.name}: {len(skipped)} example(s) marked +SKIP; make them run (tests/doctest_namespace.py "
            "provides a tiny model, tokens, an SAE, a training run ...) or add the docstring to SKIPS with why"
        )
        for ex in skipped:
            assert re.search(r"#.*\w.*#\s*doctest:\s*\+SKIP", ex.source), (
                f"{test.name}: a skipped example says why on its line: {ex.source.strip()!r}"
            )
    text = "".join(ex.source for ex in test.examples)
    test.globs = doctest_ns.globals_for(test.globs, text, tmp_path)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out: list[str] = []
    runner.run(test, out=out.append, clear_globs=False)
    if runner.failures:
        pytest.fail("".join(out), pytrace=False)


def test_every_skip_is_still_needed():
    skipping = {t.name for t in DOCTESTS if any(ex.options.get(doctest.SKIP) for ex in t.examples)}
    stale = sorted(set(SKIPS) - skipping)
    assert not stale, f"SKIPS names docstrings that skip no example (any more): {stale}"
