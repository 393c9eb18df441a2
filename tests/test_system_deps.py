"""scripts/browser-deps.sh and scripts/postgres-deps.sh (both through scripts/apt-deps.sh): each branch, run
against stub commands on PATH (apt-get, sudo, id, tee, chmod, rm record their calls; nothing is installed or
written outside tmp_path). Every branch exits 0 (the scripts never fail scripts/test.sh), says why the tests
will skip where it cannot install, and installs exactly its packages where it may."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash") or "/bin/bash"
SCRIPTS = {
    # script: (who, what is missing, the packages, the apt log, services kept from starting)
    "browser-deps.sh": (
        "browser tests",
        "no chromium",
        "chromium fonts-dejavu-core",
        "/tmp/interplab-apt.log",
        False,
    ),
    "postgres-deps.sh": (
        "PostgreSQL tests",
        "no initdb",
        "postgresql",
        "/tmp/interplab-apt-postgres.log",
        True,
    ),
}
STUB = """#!{bash}
echo "{name} $*" >> "$CALLS"
{body}
"""
STUBS = {
    "apt-get": 'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> "$CALLS"; exit "${APT_RC:-0}"',
    "id": 'echo "${FAKE_UID:-1000}"',
    "sudo": '[ "${SUDO_OK:-0}" = 1 ] || exit 1; shift; [ "$1" = true ] && exit 0; "$@"',
    "tee": "while read -r _; do :; done",
    "chmod": "",
    "rm": "",
}


def run(tmp_path: Path, script: str, *, stubs: dict[str, str], **env: str) -> tuple[str, list[str]]:
    """Run a copy of ``script`` (its one absolute probe, /usr/bin/chromium, pointed into tmp_path) with only
    ``stubs`` (and dirname) on PATH; its output and the stubs' calls."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    for name in (script, "apt-deps.sh"):
        text = (ROOT / "scripts" / name).read_text().replace("/usr/bin/chromium", str(tmp_path / "chromium"))
        (scripts / name).write_text(text.replace("/tmp/interplab-apt", str(tmp_path / "interplab-apt")))
    (bin_dir / "dirname").symlink_to(shutil.which("dirname") or "/usr/bin/dirname")
    for name, body in stubs.items():
        (bin_dir / name).write_text(STUB.format(bash=BASH, name=name, body=body))
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    done = subprocess.run(
        [BASH, str(scripts / script)],
        env={"PATH": str(bin_dir), "CALLS": str(calls), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    return done.stdout, calls.read_text().splitlines()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_without_apt_get_it_says_the_tests_will_skip(tmp_path, script):
    who, missing, *_ = SCRIPTS[script]
    out, calls = run(tmp_path, script, stubs={k: STUBS[k] for k in ("id", "sudo")}, SUDO_OK="1")
    assert out.startswith(f"{who} will skip: {missing} and no apt-get here (install ")
    assert calls == []


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_without_root_or_sudo_it_says_how_to_install(tmp_path, script):
    who, missing, packages, *_ = SCRIPTS[script]
    out, calls = run(tmp_path, script, stubs=STUBS)
    assert out == f"{who} will skip: {missing} (install it with: sudo apt-get install {packages})\n"
    assert [c.split()[0] for c in calls] == ["id", "sudo"]


@pytest.mark.parametrize("root", [True, False], ids=["root", "sudo"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_it_installs_exactly_its_packages_as_root_or_through_sudo(tmp_path, script, root):
    who, _, packages, _, quiet_services = SCRIPTS[script]
    env = {"FAKE_UID": "0"} if root else {"SUDO_OK": "1"}
    out, calls = run(tmp_path, script, stubs=STUBS, **env)
    first = packages.split()[0]
    assert out.splitlines()[0] == f"installing Debian's {first} for the {who} (apt-get) ..."
    assert out.splitlines()[1].startswith(f"{first} installed in ")
    apt = [c for c in calls if c.startswith("apt-get") or c.startswith("DEBIAN")]
    assert apt == [
        "apt-get update -qq",
        "DEBIAN_FRONTEND=noninteractive",
        f"apt-get install -y -qq --no-install-recommends {packages}",
        "DEBIAN_FRONTEND=noninteractive",
    ]
    guarded = quiet_services and not Path("/usr/sbin/policy-rc.d").exists()
    assert ("tee /usr/sbin/policy-rc.d" in calls) == guarded
    assert ("rm -f /usr/sbin/policy-rc.d" in calls) == guarded
    if guarded:  # the guard is up before the install and taken down after it
        assert calls.index("tee /usr/sbin/policy-rc.d") < calls.index("apt-get update -qq")
        assert calls.index("rm -f /usr/sbin/policy-rc.d") == len(calls) - 1
    if not root:
        assert f"sudo -n apt-get install -y -qq --no-install-recommends {packages}" in calls


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_failed_install_says_where_the_log_is_and_still_exits_0(tmp_path, script):
    who, _, packages, log, _ = SCRIPTS[script]
    out, _ = run(tmp_path, script, stubs=STUBS, FAKE_UID="0", APT_RC="100")
    moved = log.replace("/tmp/interplab-apt", str(tmp_path / "interplab-apt"))
    assert (
        out.splitlines()[-1]
        == f"{who} will skip: apt-get could not install {packages.split()[0]} (see {moved})"
    )
    assert Path(moved).exists()


@pytest.mark.parametrize(
    ("script", "present"), [("browser-deps.sh", "chromium"), ("postgres-deps.sh", "initdb")]
)
def test_nothing_happens_where_the_program_is_there(tmp_path, script, present):
    out, calls = run(tmp_path, script, stubs={**STUBS, present: ""}, FAKE_UID="0")
    assert out == "" and calls == []


def test_a_postgres_url_of_ones_own_needs_no_install(tmp_path):
    out, calls = run(tmp_path, "postgres-deps.sh", stubs=STUBS, FAKE_UID="0", INTERPLAB_TEST_POSTGRES_URL="x")
    assert out == "" and calls == []
