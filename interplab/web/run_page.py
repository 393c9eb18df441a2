"""The run page: one plain view of everything a run folder holds (`run_view`), built from its ``log.jsonl``,
``report.json``, formation scores, SAEs with their evaluation and attribution reports.

What the run holds is found by `interplab.web.runs.contents`, and every file is read through
`interplab.web.runs.read_json` / `read_bytes`, so the page keeps that module's guarantees: it stays inside the
``--runs`` folder the run was found under, and a file that is missing, unreadable, too large or of an
unexpected shape shows as missing, never as an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from interplab import runs
from interplab.dynamics.mcmc import RHAT_THRESHOLD
from interplab.scrub.result import OTHERS, PALETTE, sample_lines
from interplab.web.runs import (
    MAX_LOG_BYTES,
    Artifact,
    contained,
    contents,
    read_bytes,
    read_json,
    report_scalars,
    sae_config,
)

_X_KEYS = ("step", "steps", "checkpoint", "checkpoints", "tokens", "epoch")
_NOT_CURVES = ("time", "elapsed", "elapsed_s", "wall", "seconds")
_GROUP_KEYS = ("event", "sae")  # a log line's series are named "<event>/<key>", "<sae>/<key>"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def log_curves(path: Path, root: Path) -> dict[str, dict[str, list]]:
    """Numeric series of a ``log.jsonl``: ``{"loss": {"x": steps, "y": values}, "eval/val_loss": ...}``.

    Lines of several SAEs (or events) are kept apart: ``"<sae>/fvu"``."""
    curves: dict[str, dict[str, list]] = {}
    data = read_bytes(path, root, MAX_LOG_BYTES)
    lines = [] if data is None else data.decode(errors="replace").splitlines()
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(rec, dict):
            continue
        x = next((rec[k] for k in _X_KEYS if _num(rec.get(k))), i)
        prefix = "".join(f"{rec[g]}/" for g in _GROUP_KEYS if isinstance(rec.get(g), str))
        for k, v in rec.items():
            if k in _X_KEYS or not _num(v) or k in _NOT_CURVES:
                continue
            c = curves.setdefault(prefix + str(k), {"x": [], "y": []})
            c["x"].append(x)
            c["y"].append(v)
    return curves


def report_curves(report: Any) -> dict[str, dict[str, list]]:
    """Series in a ``report.json``: lists of numbers (against a sibling step list when there is one) and
    lists of records (``[{"step": 100, "induction": 0.3}, ...]``), found at any depth."""
    curves: dict[str, dict[str, list]] = {}

    def walk(node: Any, prefix: str, level: int) -> None:
        if not isinstance(node, dict) or level > 8:
            return
        xs = next(
            (node[k] for k in _X_KEYS if isinstance(node.get(k), list) and all(_num(v) for v in node[k])),
            None,
        )
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, list) and len(v) > 1 and all(_num(e) for e in v) and k not in _X_KEYS:
                x = xs if xs is not None and len(xs) == len(v) else list(range(len(v)))
                curves[name] = {"x": list(x), "y": list(v)}
            elif isinstance(v, list) and len(v) > 1 and all(isinstance(e, list) for e in v):
                flat = [_flatten(e) for e in v]  # e.g. a score per layer and head at each checkpoint
                if all(flat) and all(_num(x) for e in flat for x in e):
                    x = xs if xs is not None and len(xs) == len(v) else list(range(len(v)))
                    curves[f"{name} (max)"] = {"x": list(x), "y": [max(e) for e in flat]}
            elif isinstance(v, list) and len(v) > 1 and all(isinstance(e, dict) for e in v):
                for key in sorted({str(kk) for e in v for kk, vv in e.items() if _num(vv)} - set(_X_KEYS)):
                    pts = [
                        (next((e[x] for x in _X_KEYS if _num(e.get(x))), i), e[key])
                        for i, e in enumerate(v)
                        if _num(e.get(key))
                    ]
                    if len(pts) > 1:
                        curves[f"{name}/{key}"] = {"x": [p[0] for p in pts], "y": [p[1] for p in pts]}
            elif isinstance(v, dict):
                walk(v, f"{name}/", level + 1)

    walk(report, "", 0)
    return curves


def _flatten(node: Any, level: int = 0) -> list:
    if isinstance(node, list) and level < 8:
        return [x for e in node for x in _flatten(e, level + 1)]
    return [node]


def chart_group(curves: dict[str, dict[str, list]]) -> dict[str, Any]:
    """``{"curves": series that vary, "constant": {name: value}}``: a page draws no flat lines, it names
    the constants instead."""
    varying, constant = {}, {}
    for name, c in curves.items():
        ys = c["y"]
        if len(ys) > 1 and all(y == ys[0] for y in ys):
            constant[name] = ys[0]
        else:
            varying[name] = c
    return {"curves": varying, "constant": constant}


def _text(v: Any, limit: int = 300) -> str:
    if v is None:
        return ""
    return (v if isinstance(v, str) else json.dumps(v, default=str))[:limit]


def _number(v: Any) -> float | int | None:
    return v if _num(v) else None


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.relative_to(base))
    except ValueError:
        return p.name


def run_view(art: Artifact) -> dict[str, Any]:
    """Everything the run page shows, in one view: results, training curves, formation curves, SAEs with
    their evaluation and training curves, attribution reports, causal-scrubbing reports (one per hypothesis),
    other series, checkpoints, feature databases.

    Every value is plain (str, finite number, None, lists and dicts of those) and every field that is
    missing or of another shape becomes None or empty."""
    path, root = art.path, art.root
    report = read_json(path / runs.REPORT, root)
    config = read_json(path / runs.CONFIG, root)
    parts = contents(path, root)
    series = report_curves(report)
    for k in [k for k in series if k.split("/")[0] in ("checkpoints", "skipped_checkpoints")]:
        del series[k]
    log = log_curves(path / runs.LOG, root)
    formation = [formation_view(p, path, root) for p in parts["formation"]]
    attributions = [attribution_view(p, path, root) for p in parts["attributions"]]
    llc = [llc_view(p, path, root) for p in parts["llc"]]
    own_diff = [path / runs.DIFF_JSON] if _is_file(path / runs.DIFF_JSON, root) else []  # a diff's own folder
    return {
        "what": art.what,
        "timeline": timeline_view(log, formation, llc, attributions),
        "llc": llc,
        "scalars": report_scalars(report),
        "config": json.dumps(config, indent=1, sort_keys=True, default=str)[:20000] if config else "",
        "curves": chart_group(log),
        "report_curves": chart_group(series),
        "formation": formation,
        "diffs": [
            diff_view(p, path, root)
            for p in [*own_diff, *sorted((path / runs.DIFFS).glob(f"*/{runs.DIFF_JSON}"))]
        ],
        "across": [
            v
            for p in [path, *sorted(p.parent for p in (path / runs.GRAPHS).glob(f"*/{runs.REPORT}"))]
            if (v := across_view(p, path, root)) is not None
        ],
        "checkpoints": [_checkpoint_step(p) for p in parts["checkpoints"]],
        "final": [_rel(p, path) for p in parts["final"]],
        "saes": sae_views(parts, path, root),
        "sub_logs": {
            _rel(p, path): chart_group(c) for p in parts["logs"] if (c := log_curves(p / runs.LOG, root))
        },
        "attributions": attributions,
        "scrubs": [scrub_view(p, path, root) for p in parts["scrubs"]],
        "databases": parts["databases"],
        "graphs": parts["graphs"],
    }


def _checkpoint_step(p: Path) -> int | str:
    step = runs.checkpoint_step(p.name)
    return p.name if step is None else step


def formation_view(p: Path, base: Path, root: Path) -> dict[str, Any]:
    """``formation.json`` of `interplab formation`: its summary, formation step and every curve."""
    data = read_json(p, root)
    data = data if isinstance(data, dict) else {}
    curves = report_curves({k: v for k, v in data.items() if k != "tokens"})
    return {
        "where": _rel(p.parent, base) if p.parent != base else ".",
        "summary": _text(data.get("summary"), 2000),
        "formation_step": _number(data.get("formation_step")),
        "curves": chart_group(curves),
    }


def _numbers(v: Any, n: int | None = None) -> list | None:
    """``v`` as a list of finite numbers (None for a missing SE: drawn without a bar), else None."""
    if not isinstance(v, list) or (n is not None and len(v) != n):
        return None
    if not all(_num(e) or e is None for e in v):
        return None
    return list(v)


def llc_view(folder: Path, base: Path, root: Path) -> dict[str, Any]:
    """An LLC curve (`interplab llc` writes ``llc/report.json``): per component its values and SEs against
    step, each point's convergence diagnostics (R-hat, bulk / tail ESS, and ``mixed``: R-hat below
    `mcmc.RHAT_THRESHOLD`, None where unknown, as in a report written before them), the sampler settings and
    the summary."""
    report = read_json(folder / runs.REPORT, root)
    report = report if isinstance(report, dict) else {}
    steps = _numbers(report.get("steps")) or []
    llc, se = _dict(report.get("llc")), _dict(report.get("se"))
    diag = {k: _dict(report.get(k)) for k in ("rhat", "ess_bulk", "ess_tail")}
    series: list[dict[str, Any]] = []
    unmixed = 0
    for name, values in list(llc.items())[:64]:
        ys = _numbers(values, len(steps))
        if ys is None or any(y is None for y in ys):
            continue
        errs = _numbers(se.get(name), len(steps))
        point = {k: _numbers(d.get(name), len(steps)) or [None] * len(steps) for k, d in diag.items()}
        mixed = [None if r is None else r < RHAT_THRESHOLD for r in point["rhat"]]
        unmixed += sum(m is False for m in mixed)
        series.append({"name": _text(name, 60), "x": steps, "y": ys, "err": errs, **point, "mixed": mixed})
    config = _dict(report.get("config"))
    keys = ("step_size", "gamma", "nbeta", "chains", "draws", "burn_in", "batch_size", "seed")
    return {
        "where": _rel(folder, base),
        "unmixed": unmixed,
        "rhat_threshold": RHAT_THRESHOLD,
        "summary": _text(report.get("summary"), 2000),
        "series": series,
        "config": {k: _number(config.get(k)) for k in keys},
    }


_MECHANISM = ("induction", "prev")
_TRAINING = ("loss", "val_loss", "eval/val_loss")


def timeline_view(
    log: dict[str, dict[str, list]],
    formation: list[dict[str, Any]],
    llc: list[dict[str, Any]],
    attributions: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """The run's formation on one step axis: training curves, mechanism scores, the LLC (total, then per
    component) and the formation window of the first attribution with its top sequences. None when the
    run has fewer than two of these to put side by side."""
    panels = []
    train = [{"name": k, **log[k]} for k in _TRAINING if k in log and len(log[k]["x"]) > 1]
    if train:
        panels.append({"title": "training loss", "series": train})
    formation_step = None
    if formation:
        f = formation[0]
        formation_step = f["formation_step"]
        curves = f["curves"]["curves"]
        scores = [{"name": k, **c} for k, c in curves.items() if any(m in k for m in _MECHANISM)]
        if scores:
            panels.append({"title": "mechanism scores", "series": scores})
    if llc:
        total = [s for s in llc[0]["series"] if s["name"] == "all"]
        parts = [s for s in llc[0]["series"] if s["name"] != "all"]
        if total:
            panels.append({"title": "LLC (all parameters)", "series": total})
        if parts:
            panels.append({"title": "LLC per component", "series": parts})
    window, top, target, ranking = None, [], None, None
    for a in attributions:
        w = [_number(_to_float(x)) for x in a["window"]]
        if len(w) == 2 and None not in w:
            window, top, target, ranking = w, a["top"], a["target"], a["ranking"]
            break
    if len(panels) + (window is not None) < 2:
        return None
    return {
        "panels": panels,
        "rhat_threshold": RHAT_THRESHOLD,
        "formation_step": formation_step,
        "window": window,
        "target": target,
        "top": top,
        "ranking": ranking,
    }


def _to_float(v: Any) -> float | int | None:
    """A window bound as a number (steps are written as strings in the attribution view): an int if whole."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return int(x) if x.is_integer() else x


def diff_view(p: Path, base: Path, root: Path) -> dict[str, Any]:
    """A model diff of two of the run's checkpoints (``diffs/<name>/diff.json`` of `interplab sae diff`): its
    counts, whether it brackets the formation step, and the latents leaning most towards the later checkpoint
    (the new ones first) with their strongest held-out contexts."""
    data = read_json(p, root)
    data = data if isinstance(data, dict) else {}
    rel = _list(data.get("relative_norm"))
    labels = _list(data.get("labels"))
    cos = _list(data.get("cosine"))
    examples = _dict(data.get("examples"))
    latents = []
    for i in _list(data.get("leaning_new"))[:20]:
        if not isinstance(i, int) or not 0 <= i < len(rel):
            continue
        ex = [e for e in _list(examples.get(str(i))) if isinstance(e, dict)][:3]
        latents.append(
            {
                "latent": i,
                "label": _text(labels[i] if i < len(labels) else "", 20),
                "relative_norm": _number(rel[i]),
                "cosine": _number(cos[i]) if i < len(cos) else None,
                "examples": [
                    {"context": _text(e.get("context"), 200), "act": _number(e.get("act"))} for e in ex
                ],
            }
        )
    formation = _dict(data.get("formation"))
    folder = p.parent
    html = folder / "relative_norm.html"
    return {
        "where": _rel(folder, base),
        "before": _text(data.get("before"), 200),
        "after": _text(data.get("after"), 200),
        "counts": {k: _number(v) for k, v in _dict(data.get("counts")).items() if isinstance(k, str)},
        "fvu": _number(data.get("fvu")),
        "formation_step": _number(formation.get("formation_step")),
        "brackets": formation.get("brackets") is True,
        "latents": latents,
        "plot": _rel(html, base) if _is_file(html, root) else None,
        "database": folder / runs.FEATURE_DB if _is_file(folder / runs.FEATURE_DB, root) else None,
    }


def across_view(folder: Path, base: Path, root: Path) -> dict[str, Any] | None:
    """Attribution graphs across checkpoints (``graphs/NAME/report.json`` of `interplab graph across`, kind
    graph_across) in step order: each graph's scores and sizes, the formation scores at its step, what
    appeared or vanished since the previous graph, and the link to its graph page. None when ``folder`` holds
    none."""
    data = read_json(folder / runs.REPORT, root)
    if not isinstance(data, dict) or data.get("kind") != runs.Kind.GRAPH_ACROSS.value:
        return None
    steps = _list(data.get("steps"))  # counts[k]: what changed from steps[k] to steps[k + 1]
    since = {s: _dict(c) for s, c in zip(steps[1:], _list(data.get("counts")), strict=False)}
    rows = []
    for g in _dicts(data.get("graphs"), 200):
        c = since.get(g.get("step"), {})
        sub = g.get("folder")
        link = None
        if isinstance(sub, str) and "/" not in sub and _is_file(folder / sub / runs.GRAPH_JSON, root):
            link = _rel(folder / sub, base)
        influence = _numbers(g.get("position_influence")) or []
        p = _numbers(g.get("target_probability")) or []
        qk = _dict(g.get("qk"))
        top = _dict((_list(qk.get("top")) or [None])[0])
        rows.append(
            {
                "step": _number(g.get("step")),
                "induction": _number(g.get("induction")),
                "prev_token": _number(g.get("prev_token")),
                "p_target": p[0] if p else None,
                "replacement": _number(g.get("replacement")),
                "completeness": _number(g.get("completeness")),
                "features": _number(g.get("n_features")),
                "kept_features": _number(g.get("n_kept_features")),
                "edges": _number(g.get("n_edges")),
                "earlier": _number(sum(x for x in influence[:-1] if x is not None)) if influence else None,
                "appeared": _number(c.get("nodes_appeared")),
                "vanished": _number(c.get("nodes_vanished")),
                "edges_appeared": _number(c.get("edges_appeared")),
                "edges_vanished": _number(c.get("edges_vanished")),
                "graph": link,
                "qk_score": _number(qk.get("score")),
                "qk_previous": _number(qk.get("through_previous")),
                "qk_top": _text(f"{top.get('label')}: {_number(top.get('part')):+.3f}", 300)
                if isinstance(_number(top.get("part")), int | float)
                else None,
            }
        )
    rows.sort(key=lambda r: r["step"] if isinstance(r["step"], int | float) else math.inf)
    html = folder / "across.html"
    formation = _dict(data.get("formation"))
    return {
        "where": _rel(folder, base) if folder != base else ".",
        "targets": [_text(t, 100) for t in _list(data.get("targets"))[:5]],
        "prompt": _text(_dict(data.get("meta")).get("prompt") or "", 500),
        "formation_step": _number(formation.get("formation_step")),
        "rows": rows,
        "qk": _qk_head(data),
        "plot": _rel(html, base) if _is_file(html, root) else None,
    }


def _qk_head(data: dict[str, Any]) -> str | None:
    """``L{layer}H{head}, query Q -> key K`` of the QK attribution the graphs carry, or None."""
    for g in _dicts(data.get("graphs"), 200):
        qk = _dict(g.get("qk"))
        if qk:
            vals = [_number(qk.get(k)) for k in ("layer", "head", "query_pos", "key_pos")]
            return f"L{vals[0]}H{vals[1]}, query {vals[2]} -> key {vals[3]}"
    return None


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


def sae_views(parts: dict[str, list[Path]], base: Path, root: Path) -> list[dict[str, Any]]:
    """The run's SAEs: configuration and, when evaluated, the evaluation's headline numbers."""
    evals: dict[str, dict] = {}
    for folder in parts["evals"]:
        rep = read_json(folder / runs.REPORT, root)
        for row in rep.get("saes", []) if isinstance(rep, dict) else []:
            if isinstance(row, dict) and isinstance(row.get("name"), str):
                evals[row["name"]] = row
    out = []
    for folder in parts["saes"]:
        ev = evals.get(folder.name, {})
        keys = ("l0", "fvu", "explained_variance", "ce_loss_recovered", "kl_div", "dead_fraction", "tokens")
        out.append(
            {
                "name": folder.name,
                "where": _rel(folder, base),
                "config": sae_config(folder, root),
                "eval": {k: _number(ev.get(k)) for k in keys},
                "evaluated": bool(ev),
            }
        )
    return out


def attribution_view(folder: Path, base: Path, root: Path) -> dict[str, Any]:
    """An attribution report (``interplab attribute`` writes ``attribution/<target>/report.json``)."""
    report = read_json(folder / runs.REPORT, root)
    report = report if isinstance(report, dict) else {}
    top = report.get("top")
    target = _text(report.get("target"), 200) or folder.name
    rises = report.get("rises")
    # the sign convention (docs/attribution.md): a loss falls as the model learns, so the sequences that helped
    # it score negative; a report without ``rises`` predates the field and is read from its target's name
    falls = rises is False or (rises is None and target.startswith("loss"))
    rows: list[tuple[float | int | None, dict[str, Any]]] = []
    for row in top if isinstance(top, list) else []:
        row = row if isinstance(row, dict) else {}
        seq = row.get("sequence")
        score = _number(row.get("score"))
        shown = {
            "sequence": seq if _num(seq) or isinstance(seq, str) else None,
            "score": score,
            "text": _text(row.get("text")),
        }
        rows.append((score, shown))
    # whatever order the file lists them in, the most formative come first
    rows.sort(key=lambda r: _rank_key(r[0], falls))
    listed = [r for _, r in rows[:5]]
    if falls:
        ranking = "lowest score first: these sequences lowered the loss most (helped)"
        if rises is None:
            ranking += (
                "; this report predates the sign fix and lists the sequences that raised the loss most: run "
                "interplab attribute again for the helpful ones"
            )
    else:
        ranking = "highest score first: these sequences raised the target most"
    if report.get("grads", "exact") == "exact":
        # a report without ``grads`` predates the field and was made by the projected route
        ranking += (
            "; scored through a random projection of the gradients (grads=exact), whose noise can swamp the "
            "tiny gradient cosines of a run: run interplab attribute again for exact, unprojected scores"
        )
    enriched = report.get("enriched_tokens")
    tokens = [
        _text(e.get("token") if isinstance(e, dict) else e, 40)
        for e in (enriched if isinstance(enriched, list) else [])[:12]
    ]
    window = report.get("window")
    return {
        "where": _rel(folder, base),
        "target": target,
        "window": [_text(w, 20) for w in window[:2]] if isinstance(window, list) else [],
        "ranking": ranking,
        "n_candidates": _number(report.get("n_candidates")),
        "method": _text(report.get("method"), 300),
        "top": listed,
        "enriched": tokens,
        "curves": chart_group(report_curves({k: report.get(k) for k in ("curve", "mass") if k in report})),
    }


def _rank_key(score: float | None, falls: bool) -> tuple[bool, float]:
    """Sort key of an attribution row: missing scores last; else by score, descending (ascending when the
    target falls as it forms, as a loss does)."""
    if score is None:
        return (True, 0.0)
    return (False, score if falls else -score)


def _estimate(e: Any) -> dict[str, float | None]:
    """A scrub report's ``{mean, se, ci_low, ci_high, ...}`` (missing or odd parts as None)."""
    e = e if isinstance(e, dict) else {}
    keys = ("mean", "se", "ci_low", "ci_high", "seeds_low", "seeds_high")
    return {k: _number(e.get(k)) for k in keys}


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _dicts(v: Any, limit: int) -> list[dict]:
    return [e for e in v[:limit] if isinstance(e, dict)] if isinstance(v, list) else []


def scrub_view(folder: Path, base: Path, root: Path) -> dict[str, Any]:
    """A causal-scrubbing report (`interplab scrub` writes ``<run>/<hypothesis>/report.json``): the numbers,
    the per-claim and per-class breakdowns, the sampled inputs of the first references (their lines coloured
    by data-set row, as in the report page) and whether a ``report.html`` is there to open."""
    report = read_json(folder / runs.REPORT, root)
    report = report if isinstance(report, dict) else {}
    claims = [
        {
            "claim": _text(r.get("claim"), 300),
            "loss": _estimate(r.get("loss")),
            "recovered": _estimate(r.get("recovered")),
        }
        for r in _dicts(report.get("per_claim"), 500)
    ]
    per_class = _dict(report.get("per_class"))
    classes = [
        {
            "name": _text(name, 100),
            "n": _number(c.get("n")),
            **{k: _estimate(c.get(k)) for k in ("original", "random", "scrubbed")},
        }
        for name, c in list(per_class.items())[:50]
        if isinstance(c, dict)
    ]
    inputs = _dict(report.get("inputs"))
    samples = []
    for sample in _dicts(report.get("samples"), 20):
        rows = {
            str(k)[:300]: v
            for k, v in list(sample.items())[:500]
            if isinstance(v, int) and not isinstance(v, bool)
        }
        samples.append(
            [
                {
                    "depth": min(line.depth, 30),
                    "label": line.label,
                    "others": line.key.endswith(OTHERS),
                    "row": line.row,
                    "letter": line.letter,
                    "colour": PALETTE[line.tag % len(PALETTE)],
                    "input": _text(inputs.get(str(line.row)), 200),
                }
                for line in sample_lines(rows)
            ]
        )
    where = _rel(folder, base) if folder != base else ""
    return {
        "where": where,
        "hypothesis": _text(report.get("hypothesis"), 200) or folder.name,
        "task": _text(report.get("task"), 200),
        "description": _text(report.get("description"), 5000),
        "n_examples": _number(report.get("n_examples")),
        "n_seeds": _number(report.get("n_seeds")),
        **{
            k: _estimate(report.get(k))
            for k in ("loss_original", "loss_random", "loss_scrubbed", "recovered")
        },
        "per_claim": claims,
        "per_class": classes,
        "samples": samples,
        "warnings": [_text(w, 500) for w in report.get("warnings", [])[:20]]
        if isinstance(report.get("warnings"), list)
        else [],
        "report_html": f"{where}/report.html" if where else "report.html",
        "has_html": _is_file(folder / "report.html", root),
    }


def _is_file(path: Path, root: Path) -> bool:
    real = contained(path, root)
    return real is not None and real.is_file()
