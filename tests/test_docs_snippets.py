"""Every ```python block of the README (and of docs/readme/*.md, which the README is assembled from) runs.

Each block runs alone in a fresh interpreter, in an empty temporary folder, with the checkout on PYTHONPATH,
offline, on one thread. `../shared/...` paths are pointed at the real shared folder. A block that cannot run
here (needs a trained run, the network, or is illustrative) is marked in the markdown with
`<!-- no-test: reason -->` on the line before its fence.
"""

import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.scripts_env import ROOT, SHARED, run_python, tail

TIMEOUT_S = 150  # the paren-balancer scrub takes ~85 s on a loaded 2-core machine
NO_TEST = re.compile(r"^\s*<!--\s*no-test:\s*(?P<reason>.+?)\s*-->\s*$")
SHARED_PATH = re.compile(r"(?:\.\./)+shared(?=/|\b)")


@dataclass(frozen=True)
class Snippet:
    file: Path
    index: int  # 1-based among the file's python blocks
    line: int  # line of the opening fence
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT).as_posix()}:{self.index}"


def python_blocks(path: Path) -> list[Snippet]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i, index = [], 0, 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*(\w+)?", lines[i])
        if not fence:
            i += 1
            continue
        indent, ticks, lang = fence.group(1), fence.group(2), (fence.group(3) or "").lower()
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(ticks):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        if lang not in ("python", "py"):
            continue
        index += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NO_TEST.match(previous)
        blocks.append(Snippet(path, index, start + 1, "\n".join(body) + "\n", marker and marker["reason"]))
    return blocks


def collect(files: list[Path] | None = None) -> list[Snippet]:
    """docs/readme's blocks, then the README's own; a README block that repeats a docs/readme block runs once,
    and a no-test marker on either copy applies (the assembled README may drop the HTML comments)."""
    files = files or [*sorted((ROOT / "docs" / "readme").glob("*.md")), ROOT / "README.md"]
    first: dict[str, Snippet] = {}
    for path in files:
        if not path.is_file():
            continue
        for snippet in python_blocks(path):
            kept = first.setdefault(snippet.code.strip(), snippet)
            if kept is not snippet and snippet.skip_reason and not kept.skip_reason:
                first[snippet.code.strip()] = replace(kept, skip_reason=snippet.skip_reason)
    return list(first.values())


SNIPPETS = collect()


def test_snippets_found():
    assert any(s.file.parent.name == "readme" for s in SNIPPETS), "no ```python block in docs/readme/*.md"


def test_parser_reads_markers_and_blocks(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "text\n```bash\nls\n```\n<!-- no-test: needs runs/x -->\n\n```python\na = 1\n```\n"
        "- item\n  ```python\n  b = 2\n  ```\n"
    )
    first, second = python_blocks(md)
    assert (first.index, first.line, first.code, first.skip_reason) == (1, 7, "a = 1\n", "needs runs/x")
    assert (second.index, second.code, second.skip_reason) == (2, "b = 2\n", None)


def test_readme_copy_runs_once_and_keeps_the_marker(tmp_path):
    section, readme = tmp_path / "section.md", tmp_path / "README.md"
    section.write_text("<!-- no-test: needs runs/x -->\n```python\na = 1\n```\n")
    readme.write_text("```python\nb = 2\n```\n\n```python\na = 1\n```\n")
    snippets = collect([section, readme])
    assert [(s.file.name, s.code, s.skip_reason) for s in snippets] == [
        ("section.md", "a = 1\n", "needs runs/x"),
        ("README.md", "b = 2\n", None),
    ]
    snippets = collect([readme, section])  # the marker also applies when the unmarked copy comes first
    assert [(s.file.name, s.skip_reason) for s in snippets] == [
        ("README.md", None),
        ("README.md", "needs runs/x"),
    ]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, tmp_path: Path):
    if snippet.skip_reason:
        pytest.skip(f"{snippet.id} marked no-test: {snippet.skip_reason}")
    code = snippet.code
    if SHARED_PATH.search(code):
        if not SHARED.is_dir():
            pytest.skip(f"{snippet.id} reads ../shared, absent here ({SHARED}); set INTERPLAB_SHARED")
        code = SHARED_PATH.sub(SHARED.as_posix(), code)
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    done = run_python([str(script)], cwd=tmp_path, timeout=TIMEOUT_S)
    assert done.returncode == 0, (
        f"{snippet.id} (line {snippet.line}) failed with exit code {done.returncode}\n"
        f"--- stdout\n{tail(done.stdout)}\n--- stderr\n{tail(done.stderr)}"
    )
