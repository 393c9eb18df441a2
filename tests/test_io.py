"""interplab.io: atomic writes."""

import os
import stat

from interplab.io import atomic_write_text


def test_atomic_writes_get_normal_permissions(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
