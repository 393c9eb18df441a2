"""The newcomer path: the demo's output names are defined once and used everywhere, and the README's feature
browser commands and snippet run, as written, on what the demo really writes (`interplab demo --quick`)."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from interplab import runs
from interplab.cli.demo import DEMO_RUN, DemoOutputs
from tests.scripts_env import ROOT, run_python, script_env, tail

FEATURES_MD = ROOT / "docs" / "readme" / "features.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").glob("*.py"))]
DEMO_TIMEOUT_S = 900  # ~2 min on a loaded 2-core machine with the token cache warm; tokenizing adds a few


def bash_commands(markdown: Path) -> list[list[str]]:
    """The ``interplab ...`` commands of a file's ```bash blocks, continuation lines joined, comments dropped."""
    text = markdown.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["interplab"]:
                commands.append(words[1:])
    return commands


def python_block(markdown: Path) -> str:
    return re.findall(r"^```python\n(.*?)^```", markdown.read_text(encoding="utf-8"), re.M | re.S)[0]


def _demo_diff(p: Path) -> bool:
    """``runs/demo/diffs/step_A-step_B``: where `interplab sae diff runs/demo --before A --after B` writes
    (`default_diff_folder`), named exactly as it names it."""
    from interplab.sae.diffing import default_diff_folder

    m = re.fullmatch(r"step_(\d+)-step_(\d+)", p.name)
    return p.parent == DEMO_RUN / runs.DIFFS and (
        m is not None and p == default_diff_folder(DEMO_RUN, int(m[1]), int(m[2]))
    )


def test_the_demo_names_are_the_ones_the_docs_use():
    demo = DemoOutputs()
    known = {demo.final, demo.formation, demo.sae_run, demo.sae, demo.sae_eval, demo.features_db}
    # what the demo writes into its run, and what later commands write there (`interplab attribute`, `llc`)
    outputs = {"checkpoints", "config.json", "log.jsonl", "report.json", "attribution", "site", runs.LLC}
    seen = set()
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for old in ("runs/demo-sae", "runs/induction-2l"):
            assert old not in text, (
                f"{path.relative_to(ROOT)} names {old}: the demo writes {sorted(map(str, known))}"
            )
        for found in re.findall(r"runs/demo(?:/[\w.-]+)*", text):
            p = Path(found.rstrip("."))
            seen.add(p)
            assert (
                p == DEMO_RUN
                or p in known
                or any(k in p.parents for k in known)
                or (p.parent == DEMO_RUN and p.name in outputs)
                or _demo_diff(p)
            ), f"{path.relative_to(ROOT)} names {p}, which the demo does not write (DemoOutputs: {known})"
            if demo.sae_run / "saes" in p.parents:
                assert p == demo.sae, f"{path.relative_to(ROOT)}: the demo's SAE is {demo.sae}, not {p}"
    assert {demo.final, demo.sae, demo.features_db} <= seen


def test_the_readme_feature_commands_are_parsed():
    commands = bash_commands(FEATURES_MD)
    assert [c[:2] for c in commands] == [
        ["features", "build"],
        ["serve", "--db"],
        ["features", "export"],
        ["features", "explain"],
    ]
    demo = DemoOutputs()
    assert commands[0][commands[0].index("--sae") + 1] == str(demo.sae)
    assert commands[0][commands[0].index("--out") + 1] == str(demo.features_db)


def test_the_demos_sae_command_writes_the_sae_its_outputs_name(tmp_path):
    """Stage 3's command (which `benchmarks/bench_sae_eval.py --demo-run` reuses for its reseeds) reads the
    demo's model and writes the SAE `DemoOutputs.sae` names: the SAE run and the site's folder in it."""
    from interplab.cli.demo import SAE_HOOK, SAE_STEPS, sae_train_command
    from interplab.sae.sweep import sae_name

    demo = DemoOutputs(tmp_path / "demo")
    cmd = sae_train_command(demo, SAE_STEPS, 1)
    arg = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert cmd[:2] == ["sae", "train"]
    assert (arg("--model"), arg("--hook"), arg("--out")) == (str(demo.final), SAE_HOOK, str(demo.sae_run))
    assert (arg("--arch"), arg("--k"), arg("--steps")) == ("topk", "16", str(SAE_STEPS))
    assert demo.sae == Path(arg("--out")) / "saes" / sae_name(arg("--hook"))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> tuple[Path, str]:
    """A folder where `interplab demo --quick` ran (with its default names) and what it printed."""
    work = tmp_path_factory.mktemp("newcomer")
    done = run_python(["-m", "interplab", "demo", "--quick"], cwd=work, timeout=DEMO_TIMEOUT_S)
    assert done.returncode == 0, f"--- stdout\n{tail(done.stdout)}\n--- stderr\n{tail(done.stderr)}"
    return work, done.stdout


@pytest.mark.slow
def test_the_demo_prints_commands_that_run_as_printed(demo_dir):
    work, out = demo_dir
    demo = DemoOutputs()
    for path in (demo.final, demo.sae, demo.features_db, demo.formation / "formation.png"):
        said = [line for line in out.splitlines() if path.name in line or "renderer" in line]
        assert (work / path).exists(), f"the demo did not write {path}; it printed: {said}"
    line = next(line for line in out.splitlines() if line.startswith("browse the features: "))
    words = shlex.split(line.removeprefix("browse the features: "))
    exe = Path(words[0]) if "/" in words[0] else None
    assert exe is None or (work / exe).is_file(), f"{words[0]} (the printed executable) does not exist"
    for flag in ("--db", "--model", "--sae", "--runs"):
        assert (work / words[words.index(flag) + 1]).exists(), f"{line}: {flag} names a missing path"
    assert not re.search(r"\[/?\w+\]", out.split("outputs", 1)[-1]), "rich markup leaked into the output"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_once(args: list[str], cwd: Path) -> str:
    """Start the README's serve command on a free port, fetch its home page and a feature page, stop it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "interplab", *args, "--port", str(port)],
        cwd=cwd,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                    home = r.read().decode()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"serve did not answer:\n{proc.communicate()[0]}") from None
                time.sleep(0.5)
        return home
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_readme_feature_browser_runs_on_the_demo_output(demo_dir):
    work, _ = demo_dir
    for args in bash_commands(FEATURES_MD):
        if args[0] == "serve":
            home = _serve_once(args, work)
            assert "features" in home.lower()
            continue
        done = run_python(["-m", "interplab", *args], cwd=work, timeout=600)
        assert done.returncode == 0, f"interplab {shlex.join(args)}\n{tail(done.stdout)}\n{tail(done.stderr)}"
    assert (work / DEMO_RUN / "site" / "index.html").is_file()
    snippet = work / "snippet.py"
    snippet.write_text(python_block(FEATURES_MD), encoding="utf-8")
    done = run_python([str(snippet)], cwd=work, timeout=300)
    assert done.returncode == 0, (
        f"the README's feature snippet failed:\n{tail(done.stdout)}\n{tail(done.stderr)}"
    )
