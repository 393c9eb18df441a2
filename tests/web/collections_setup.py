"""A served "sweep" for the map, lists, compare and loss-effect pages: two copies of the tiny database (one
recording its SAE's run folder, with loss effects computed), served writable, and the same read-only."""

from __future__ import annotations

from pathlib import Path

from interplab.features.loss_effects import compute_loss_effects
from interplab.features.writer import FeatureWriter
from tests.web.conftest import copy_db


def sweep_dbs(web_setup: dict, root: Path) -> tuple[Path, Path]:
    """(sweep_a.db: records the SAE of runs/train-tiny/sae and has loss effects of its top contexts,
    sweep_b.db: a plain copy)."""
    a = copy_db(web_setup["db"], root / "sweep_a.db")
    b = copy_db(web_setup["db"], root / "sweep_b.db")
    sae_dir = web_setup["runs"] / "train-tiny" / "sae" / "saes" / "blocks_0_hook_resid_pre"
    with FeatureWriter(a) as w:
        w.set_meta(sae_path=str(sae_dir.resolve()))
        w.set_label(3, "token three")
    compute_loss_effects(a, web_setup["model"], web_setup["sae"])
    return a, b
