"""The README is generated from docs/readme/*.md; keep it so, and keep its first screen's two commands."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_built_from_its_sections():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_readme.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_first_screen_shows_the_demo_and_test_commands():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    assert "bash scripts/demo.sh" in first_screen
    assert "bash scripts/test.sh" in first_screen
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci  # CI runs the README's test command


def test_ci_runs_exactly_the_readme_test_command():
    """CI installs nothing the README's test command does not: scripts/test.sh sets up everything itself."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    runs_tests = [line for line in ci if ("pytest" in line or "test.sh" in line) and not line.startswith("#")]
    assert runs_tests == ["bash scripts/test.sh"]
    assert not any("system-deps" in line or "apt-get" in line for line in ci)
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert "scripts/browser-deps.sh" in test_sh and "setup.sh --test" in test_sh


def test_scripts_say_how_to_run_what_they_print():
    """The venv is not activated by the scripts: the README says how, and the demo script's commands work."""
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme
    assert ".venv/bin/interplab demo" in (ROOT / "scripts" / "demo.sh").read_text()
