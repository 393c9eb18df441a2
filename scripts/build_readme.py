"""Assemble README.md from docs/readme/*.md: the header, one section per capability, the footer.

python scripts/build_readme.py          # write README.md
python scripts/build_readme.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = [
    "hooks",
    "loading",
    "scale",
    "training",
    "tasks",
    "analysis",
    "circuits",
    "sae",
    "features",
    "attribution",
    "routing",
    "dt",
]


def build() -> str:
    parts = ROOT / "docs" / "readme"
    sections = [parts / "_header.md", *(parts / f"{name}.md" for name in ORDER), parts / "_footer.md"]
    missing = [str(p) for p in sections if not p.is_file()]
    if missing:
        raise SystemExit(f"missing README sections: {missing}")
    extra = sorted({p.stem for p in parts.glob("*.md")} - set(ORDER) - {"_header", "_footer"})
    if extra:
        raise SystemExit(f"sections not placed in ORDER: {extra}")
    return "\n".join(_top_heading(p.read_text()).strip() + "\n" for p in sections)


def _top_heading(text: str) -> str:
    """Each section starts at level 2, whatever level its file uses."""
    lines = text.strip().splitlines()
    if lines and lines[0].startswith("#") and not lines[0].startswith("# "):
        lines[0] = "## " + lines[0].lstrip("#").strip()
    return "\n".join(lines)


def main() -> None:
    text = build()
    readme = ROOT / "README.md"
    if "--check" in sys.argv[1:]:
        if readme.read_text() != text:
            print("README.md is out of date: run python scripts/build_readme.py", file=sys.stderr)
            raise SystemExit(1)
        return
    readme.write_text(text)
    print(f"wrote {readme}")


if __name__ == "__main__":
    main()
