import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
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
