"""The decision-transformer parts of a run page (`dt_view`): the calibration curve of an evaluation, the
trajectory player (each step's grid view, the action taken, its reward and return-to-go, and the attention of
the decision token where an analysis recorded it) and the numbers of training and analysis runs.

It keeps `interplab.web.runs`' guarantees: every file is read only when it stays inside the ``--runs`` folder
the run was found under, and a missing, damaged or oversized file shows as missing, never as an error. Grid
pictures are drawn by `interplab.rl.render_obs` (minigrid's tile renderer; without the ``rl`` extra, a plain
palette) and served one step at a time (`frame_png`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from interplab import runs
from interplab.plots import png_bytes
from interplab.rl import load_trajectories, render_obs
from interplab.rl.analysis import palette_obs
from interplab.rl.envs import ACTION_NAMES
from interplab.runs import Kind
from interplab.web.runs import Artifact, contained, read_json, reader

DT_KINDS = (Kind.TRAJECTORIES, Kind.DT_MODEL, Kind.DT_TRAIN, Kind.DT_EVAL, Kind.DT_ANALYSIS)
MAX_EPISODES = 50
"""episodes the player offers (the first ones of the data set)"""
MAX_TRAJECTORY_BYTES = 500 * 2**20
"""a trajectory folder larger than this is not loaded by the page (the numbers still show)"""
FRAME_TILE = 12
"""pixels per grid cell of a player frame"""


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def dt_kind(art: Artifact) -> Kind | None:
    """The DT kind of an artifact's folder (an SAE run of `interplab dt sae` counts), or None."""
    kind = runs.detect(art.path, reader(art.root))
    if kind is Kind.SAE_TRAIN and sae_record(art.path, art.root) is not None:
        return kind
    return kind if kind in DT_KINDS else None


DT_PLAYER_JSON = "player.json"
"""`interplab dt sae`'s per-step features (`interplab.cli.dt.DT_PLAYER_JSON`)"""


def sae_record(path: Path, root: Path) -> dict[str, Any] | None:
    """What an SAE run of `interplab dt sae` read (its config.json's ``data.dt``: model, trajectories, site ...),
    or None for any other folder."""
    cfg = read_json(path / runs.CONFIG, root)
    data = cfg.get("data") if isinstance(cfg, dict) else None
    dt = data.get("dt") if isinstance(data, dict) else None
    return dt if isinstance(dt, dict) and isinstance(dt.get("trajectories"), str) else None


def _column(doc: dict[str, Any], key: str, n: int) -> list[Any]:
    v = doc.get(key)
    return list(v) if isinstance(v, list) and len(v) == n else [None] * n


def calibration_points(doc: Any) -> list[dict[str, Any]]:
    """The per-target rows of a ``calibration.json`` (`interplab.rl.Calibration.to_dict`: the columns
    ``targets``, ``counts``, ``mean_returns``, ``ci_low``, ``ci_high``): ``target``, ``episodes``, ``mean``
    (achieved return), ``ci_low``/``ci_high`` (95%; None where missing, e.g. one episode); a target without a
    finite target or mean is skipped."""
    doc = doc if isinstance(doc, dict) else {}
    targets = doc.get("targets") if isinstance(doc.get("targets"), list) else []
    n = len(targets)
    out = []
    for t, c, m, lo, hi in zip(
        targets, *(_column(doc, k, n) for k in ("counts", "mean_returns", "ci_low", "ci_high")), strict=True
    ):
        if not (_num(t) and _num(m)):
            continue
        ok = _num(lo) and _num(hi)
        out.append(
            {
                "target": float(t),
                "episodes": c if _num(c) else None,
                "mean": float(m),
                "ci_low": float(lo) if ok else None,
                "ci_high": float(hi) if ok else None,
            }
        )
    return out


def calibration_view(doc: Any) -> dict[str, Any]:
    """What the page draws of a calibration: the points, the slope with its 95% CI, the training data's return
    range and the environment's best return (each None when the document lacks it)."""
    doc = doc if isinstance(doc, dict) else {}
    slope = doc.get("slope") if isinstance(doc.get("slope"), dict) else {}
    rng = doc.get("data_range")
    return {
        "env": doc.get("env") if isinstance(doc.get("env"), str) else None,
        "points": calibration_points(doc),
        "slope": {
            k: float(slope[k]) if _num(slope.get(k)) else None for k in ("estimate", "ci_low", "ci_high")
        },
        "data_range": [float(x) for x in rng]
        if isinstance(rng, list) and len(rng) == 2 and all(map(_num, rng))
        else None,
        "max_return": float(doc["max_return"]) if _num(doc.get("max_return")) else None,
    }


def episode_targets(doc: Any) -> list[Any] | None:
    """The target return of each episode of an evaluation (``episodes.target``, in its rollouts' order)."""
    ep = doc.get("episodes") if isinstance(doc, dict) else None
    t = ep.get("target") if isinstance(ep, dict) else None
    return t if isinstance(t, list) else None


# --- trajectories ------------------------------------------------------------------------------------------


def _inside(folder: Path, root: Path) -> bool:
    """Every file of ``folder`` stays inside ``root`` and their sizes sum to at most the limit."""
    total = 0
    try:
        files = list(folder.iterdir())
    except OSError:
        return False
    for f in files:
        real = contained(f, root)
        if real is None:
            return False
        if real.is_file():
            total += real.stat().st_size
    return total <= MAX_TRAJECTORY_BYTES


@lru_cache(maxsize=8)
def _load(folder: Path, stamp: float) -> Any:
    return load_trajectories(folder)


def trajectories(folder: Path, root: Path) -> Any:
    """The `interplab.rl.Trajectories` of ``folder`` (cached while its manifest is unchanged), or None when it
    is not one, strays outside ``root``, is too large or does not load."""
    real = contained(folder, root)
    if real is None or runs.detect(real, reader(root)) is not Kind.TRAJECTORIES or not _inside(real, root):
        return None
    try:
        return _load(real, (real / runs.MANIFEST).stat().st_mtime)
    except Exception:  # a damaged or foreign folder shows as missing  # noqa: BLE001
        return None


def _episode_rows(trajs: Any, e: int, targets: Any) -> dict[str, Any]:
    lo, hi = int(trajs.episode_starts[e]), int(trajs.episode_starts[e + 1])
    actions = [int(a) for a in trajs.actions[lo:hi]]
    rewards = [float(r) for r in trajs.rewards[lo:hi]]
    rtg = [float(r) for r in trajs.rtg[lo:hi]]
    out = {
        "episode": e,
        "seed": int(trajs.seeds[e]),
        "return": float(sum(rewards)),
        "length": hi - lo,
        "actions": [ACTION_NAMES[a] if 0 <= a < len(ACTION_NAMES) else str(a) for a in actions],
        "rewards": rewards,
        "rtg": rtg,
    }
    if targets is not None and e < len(targets) and _num(targets[e]):
        out["target"] = float(targets[e])
    return out


def player_view(
    folder: Path, root: Path, attention: Any = None, targets: list[Any] | None = None
) -> dict[str, Any] | None:
    """The trajectory player's data for the trajectory folder ``folder``: its first episodes (`MAX_EPISODES`),
    per step the action name, reward and return-to-go, the episode's target return (``targets``: an
    evaluation's) and the decision token's attention where ``attention`` (an analysis report's ``attention``
    record) has it. None when the folder does not load."""
    trajs = trajectories(folder, root)
    if trajs is None:
        return None
    n = int(trajs.n_episodes)
    episodes = [_episode_rows(trajs, e, targets) for e in range(min(n, MAX_EPISODES))]
    att = attention if isinstance(attention, dict) else {}
    by_episode: dict[str, Any] = att["episodes"] if isinstance(att.get("episodes"), dict) else {}
    for ep in episodes:
        rows = by_episode.get(str(ep["episode"]))
        if isinstance(rows, list) and len(rows) == ep["length"]:
            ep["attention"] = [_attention_row(r) for r in rows]
    return {
        "env": trajs.env,
        "source": trajs.source,
        "n_episodes": n,
        "episodes": episodes,
        "attention_tokens": att.get("tokens") if isinstance(att.get("tokens"), list) else None,
        "attention_site": att.get("site") if isinstance(att.get("site"), str) else None,
    }


def _attention_row(row: Any) -> list[float] | None:
    if isinstance(row, list) and all(_num(x) for x in row):
        return [float(x) for x in row]
    return None


def frame_png(folder: Path, root: Path, episode: int, step: int) -> bytes | None:
    """A PNG of the grid view of ``step`` of ``episode`` in the trajectory folder ``folder`` (drawn by
    `interplab.rl.render_obs`; without minigrid, `interplab.rl.analysis.palette_obs`), or None when there is
    no such step."""
    trajs = trajectories(folder, root)
    if trajs is None or not 0 <= episode < int(trajs.n_episodes):
        return None
    lo, hi = int(trajs.episode_starts[episode]), int(trajs.episode_starts[episode + 1])
    if not 0 <= step < hi - lo:
        return None
    view = trajs.obs[lo + step]
    try:
        rgb = render_obs(view, tile_size=FRAME_TILE)
    except ImportError:  # no minigrid here: the analyses' own palette
        rgb = palette_obs(view, tile_size=FRAME_TILE)
    return png_bytes(np.asarray(rgb, dtype=np.uint8))


# --- the view ------------------------------------------------------------------------------------------------


def _scalars(doc: Any, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    doc = doc if isinstance(doc, dict) else {}
    out = {}
    for k, v in doc.items():
        if (keys is None or k in keys) and k not in ("kind", "version") and (_num(v) or isinstance(v, str)):
            out[str(k).replace("_", " ")] = v if not isinstance(v, str) else v[:200]
    return out


def dt_headline(path: Path, root: Path) -> dict[str, Any]:
    """The home page's numbers for a DT folder without a report.json: a data set's size and returns, an
    evaluation's slope (empty for anything else)."""
    kind = runs.detect(path, reader(root))
    if kind is Kind.TRAJECTORIES:
        return _scalars(read_json(path / runs.MANIFEST, root), ("env", "n_episodes", "n_steps"))
    if kind is Kind.DT_EVAL:
        c = calibration_view(read_json(path / runs.CALIBRATION_JSON, root))
        out: dict[str, Any] = {"env": c["env"], "targets": len(c["points"])} if c["env"] else {}
        if c["slope"]["estimate"] is not None:
            out["slope"] = c["slope"]["estimate"]
        return out
    return {}


def _player_source(art: Artifact, kind: Kind) -> tuple[Path | None, Any]:
    """The trajectory folder a DT folder's player shows (a data set itself, an evaluation's episodes, the data
    an analysis read) and the analysis' attention record (None for the other kinds)."""
    if kind is Kind.TRAJECTORIES:
        return art.path, None
    if kind is Kind.DT_EVAL:
        return art.path / runs.ROLLOUTS, None
    if kind is Kind.DT_ANALYSIS:
        report = read_json(art.path / runs.REPORT, art.root)
        report = report if isinstance(report, dict) else {}
        source = report.get("data")
        folder = art.path / source if isinstance(source, str) else None  # an absolute path stays absolute
        return folder, report.get("attention")
    if kind is Kind.SAE_TRAIN:
        rec = sae_record(art.path, art.root)
        return (Path(rec["trajectories"]) if rec is not None else None), None
    return None, None


def player_frame(art: Artifact, episode: int, step: int) -> bytes | None:
    """The PNG of one step of the run's player (`frame_png`), or None."""
    kind = dt_kind(art)
    folder = _player_source(art, kind)[0] if kind is not None else None
    return None if folder is None else frame_png(folder, art.root, episode, step)


def dt_view(
    art: Artifact, others: Sequence[Artifact] = (), databases: Mapping[Path | str, str] | None = None
) -> dict[str, Any] | None:
    """The DT section of a run page (None for any other kind of run): what the folder is, the calibration
    (an evaluation), the trajectory player (a data set, an evaluation's episodes, an analysis' data, an SAE
    run's data), the model's configuration (a training run or a model folder), an analysis' or SAE run's
    results. The player's per-step read-outs: an analysis' probe predictions and the strongest features of an
    SAE run of the same model on the same data (found among ``others``; ``databases`` names the served
    feature databases, to link each feature to its page)."""
    kind = dt_kind(art)
    if kind is None:
        return None
    path, root = art.path, art.root
    view: dict[str, Any] = {
        "kind": kind.value,
        "calibration": None,
        "player": None,
        "model": {},
        "analysis": {},
    }
    targets = None
    if kind is Kind.TRAJECTORIES:
        keys = ("env", "source", "n_episodes", "n_steps")
        view["data"] = _scalars(read_json(path / runs.MANIFEST, root), keys)
    elif kind is Kind.DT_EVAL:
        doc = read_json(path / runs.CALIBRATION_JSON, root)
        view["calibration"] = calibration_view(doc)
        targets = episode_targets(doc)
    elif kind in (Kind.DT_TRAIN, Kind.DT_MODEL):
        model = path / runs.FINAL if kind is Kind.DT_TRAIN else path
        view["model"] = _scalars(read_json(model / runs.CONFIG, root))
        view["checkpoints"] = len(runs.list_checkpoints(path)) if kind is Kind.DT_TRAIN else 0
        view["has_final"] = kind is Kind.DT_MODEL or runs.detect(model, reader(root)) is Kind.DT_MODEL
    elif kind is Kind.DT_ANALYSIS:
        view["analysis"] = _scalars(read_json(path / runs.REPORT, root))
    elif kind is Kind.SAE_TRAIN:
        report = read_json(path / runs.REPORT, root)
        report = report if isinstance(report, dict) else {}
        labels = report.get("labels")
        view["labels"] = [x for x in labels if isinstance(x, dict)] if isinstance(labels, list) else []
    folder, attention = _player_source(art, kind)
    if folder is not None:
        view["player"] = player_view(folder, root, attention, targets)
        if view["player"] is not None:
            add_readouts(view["player"], art, kind, others, databases or {})
    return view


# --- per-step read-outs: probes (an analysis) and SAE features (an SAE run of `interplab dt sae`) ---------------


def _resolved(p: Any) -> str | None:
    try:
        return str(Path(p).resolve()) if isinstance(p, str) and p else None
    except (OSError, RuntimeError, ValueError):
        return None


def _model_and_data(art: Artifact, kind: Kind | None) -> tuple[str | None, str | None]:
    """The model folder and trajectory folder (resolved) an analysis or a DT SAE run read."""
    if kind is Kind.DT_ANALYSIS:
        report = read_json(art.path / runs.REPORT, art.root)
        report = report if isinstance(report, dict) else {}
        return _resolved(report.get("model")), _resolved(report.get("data"))
    if kind is Kind.SAE_TRAIN:
        rec = sae_record(art.path, art.root) or {}
        return _resolved(rec.get("model")), _resolved(rec.get("trajectories"))
    return None, None


def _partner(art: Artifact, kind: Kind, others: Sequence[Artifact], want: Kind) -> Artifact | None:
    """Among ``others``, the first ``want`` run of the same model on the same data as ``art``."""
    mine = _model_and_data(art, kind)
    if None in mine:
        return None
    for o in others:
        if o.path != art.path and runs.detect(o.path, reader(o.root)) is want:
            if want is Kind.SAE_TRAIN and sae_record(o.path, o.root) is None:
                continue
            if _model_and_data(o, want) == mine:
                return o
    return None


def add_readouts(
    player: dict[str, Any],
    art: Artifact,
    kind: Kind | None,
    others: Sequence[Artifact],
    databases: Mapping[Path | str, str],
) -> None:
    """Attach to each player episode, per step, the probes' predictions (``probes``: ``[label, predicted,
    probability, true]``) and the strongest SAE features (``features``: ``[feature, activation]``), where an
    analysis and an SAE run of the same model on the same data recorded them."""
    if kind not in (Kind.DT_ANALYSIS, Kind.SAE_TRAIN):
        return
    analysis = art if kind is Kind.DT_ANALYSIS else _partner(art, kind, others, Kind.DT_ANALYSIS)
    sae_run = art if kind is Kind.SAE_TRAIN else _partner(art, kind, others, Kind.SAE_TRAIN)
    if analysis is not None:
        report = read_json(analysis.path / runs.REPORT, analysis.root)
        ps = report.get("probe_steps") if isinstance(report, dict) else None
        if (
            isinstance(ps, dict)
            and isinstance(ps.get("labels"), dict)
            and isinstance(ps.get("episodes"), dict)
        ):
            _probe_readouts(player, ps)
    if sae_run is not None:
        doc = read_json(sae_run.path / DT_PLAYER_JSON, sae_run.root)
        steps = doc.get("steps") if isinstance(doc, dict) else None
        if isinstance(steps, dict):
            for ep in player["episodes"]:
                rows = steps.get(str(ep["episode"]))
                if isinstance(rows, list) and len(rows) == ep["length"]:
                    ep["features"] = [_pairs(r) for r in rows]
            db = sae_run.path / (doc.get("db") if isinstance(doc.get("db"), str) else runs.FEATURE_DB)
            real = contained(db, sae_run.root)
            player["features_db"] = databases.get(real) if real is not None else None
            player["features_run"] = sae_run.name


def _probe_readouts(player: dict[str, Any], ps: dict[str, Any]) -> None:
    labels = {
        k: v for k, v in ps["labels"].items() if isinstance(v, dict) and isinstance(v.get("classes"), list)
    }
    player["probe_labels"] = {
        k: {"site": v.get("site"), "accuracy": v.get("held_out_accuracy")} for k, v in labels.items()
    }
    for ep in player["episodes"]:
        per = ps["episodes"].get(str(ep["episode"]))
        if not isinstance(per, dict):
            continue
        steps: list[list[list[Any]]] = [[] for _ in range(ep["length"])]
        for name, rows in per.items():
            classes = labels.get(name, {}).get("classes")
            if classes is None or not isinstance(rows, list) or len(rows) != ep["length"]:
                continue
            for t, r in enumerate(rows):
                if isinstance(r, list) and len(r) == 3 and all(_num(x) for x in r):
                    pred, p, true = int(r[0]), float(r[1]), int(r[2])
                    if 0 <= pred < len(classes) and 0 <= true < len(classes):
                        steps[t].append([name, str(classes[pred]), p, str(classes[true])])
        if any(steps):
            ep["probes"] = steps


def _pairs(row: Any) -> list[list[float]]:
    if not isinstance(row, list):
        return []
    return [
        [int(x[0]), float(x[1])] for x in row if isinstance(x, list) and len(x) == 2 and all(map(_num, x))
    ]


# --- a DT feature database's pages -----------------------------------------------------------------------------


def db_trajectories(meta: dict[str, Any], roots: Sequence[Path]) -> tuple[Path, Path] | None:
    """The trajectory folder a DT feature database records (``meta["dt"]["trajectories"]``) and the --runs
    folder holding it, or None when the record is missing or the folder lies outside every --runs folder."""
    dt = meta.get("dt")
    folder = dt.get("trajectories") if isinstance(dt, dict) else None
    if not isinstance(folder, str):
        return None
    for root in roots:
        try:
            real_root = Path(root).resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        real = contained(Path(folder), real_root)
        if real is not None and trajectories(real, real_root) is not None:
            return real, real_root
    return None


def db_frame(meta: dict[str, Any], roots: Sequence[Path], episode: int, step: int) -> bytes | None:
    """The PNG of one state of a DT feature database's trajectories (`frame_png`), or None."""
    where = db_trajectories(meta, roots)
    return None if where is None else frame_png(where[0], where[1], episode, step)


def dt_feature_view(
    rec: dict[str, Any], meta: dict[str, Any], store: Any, roots: Sequence[Path], frame_base: str
) -> dict[str, Any] | None:
    """A DT feature database's feature page additions (None for a language model's database): for each top
    activation its episode, step, token kind, the action taken and the return-to-go (`schema.dt_rows`), and
    the picture's URL (``frame_base/<episode>/<step>.png``) when the trajectory folder is inside a --runs
    folder; otherwise a note saying why there are no pictures."""
    dt = meta.get("dt")
    if not isinstance(dt, dict):
        return None
    where = db_trajectories(meta, roots)
    rows = store.dt_rows(c["token_index"] for c in rec["top"])
    cards = []
    for c in rec["top"]:
        r = rows.get(int(c["token_index"]))
        card: dict[str, Any] = {"act": c["act"], "token_index": c["token_index"]}
        if r is not None:
            a = int(r["action"])
            card.update(
                episode=int(r["episode"]), step=int(r["step"]), kind=str(r["token_kind"]), rtg=float(r["rtg"]),
                action=ACTION_NAMES[a] if 0 <= a < len(ACTION_NAMES) else str(a),
            )  # fmt: skip
            if where is not None:
                card["src"] = f"{frame_base}/{card['episode']}/{card['step']}.png"
        cards.append(card)
    note = None
    if where is None:
        folder = dt.get("trajectories")
        note = (
            f"no pictures: the trajectory folder {folder} is missing or lies outside the --runs folders "
            "(serve it with --runs FOLDER_HOLDING_IT)"
            if folder
            else "no pictures: the database records no trajectory folder"
        )
    return {
        "cards": cards,
        "note": note,
        "env": dt.get("env"),
        "site": dt.get("site"),
        "trajectories": dt.get("trajectories"),
    }
