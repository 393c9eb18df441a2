import os
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# torch threads per test process: scripts/test.sh shares the cores out among its pytest-xdist workers
torch.set_num_threads(int(os.environ.get("INTERPLAB_TEST_THREADS", "2")))

# the shared fixtures beside the checkout (INTERPLAB_SHARED overrides it, e.g. for a git worktree elsewhere)
SHARED = Path(os.environ.get("INTERPLAB_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(
            f"../shared is absent ({SHARED}): fixture tests need the shared folder beside the checkout"
        )
    return SHARED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def doctest_ns(tmp_path_factory):
    """The shared namespace of the docstring examples (`tests/doctest_namespace.py`)."""
    from tests.doctest_namespace import DoctestNamespace

    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("doctest")
        mp.setenv("INTERPLAB_CACHE", str(folder / "cache"))
        yield DoctestNamespace(folder)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server (`tests.postgres`): ``INTERPLAB_TEST_POSTGRES_URL``, or a throwaway one on loopback;
    skips (fails under ``INTERPLAB_REQUIRE_POSTGRES=1``) where there is neither."""
    from tests import postgres

    required = os.environ.get(postgres.REQUIRE_ENV) == "1"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        why = "the psycopg driver is not installed (pip install 'interplab[postgres]')"
        pytest.fail(why) if required else pytest.skip(why)
    try:
        url = os.environ.get(postgres.URL_ENV)
        server = postgres.PostgresServer(url) if url else postgres.PostgresServer.start()
    except (FileNotFoundError, OSError, subprocess.SubprocessError) as err:
        why = f"{err}" + (f"\n{err.stderr}" if getattr(err, "stderr", None) else "")
        pytest.fail(why) if required else pytest.skip(why)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def feature_db(request, tmp_path, monkeypatch):
    """Where a test's feature databases go, on each backend: ``feature_db("a.db")`` is ``tmp_path / "a.db"``
    on SQLite and the URL of a new database on PostgreSQL (a build's state folder then lands in tmp_path)."""
    if request.param == "sqlite":
        return lambda name="features.db": tmp_path / name
    server = request.getfixturevalue("postgres_server")
    monkeypatch.chdir(tmp_path)
    return lambda name="features.db": server.new_db()
