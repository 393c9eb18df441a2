"""Features of a decision transformer: SAEs on its residual stream over trajectories, a feature database whose
contexts are DT windows, and what the web app reads per step.

The activations are `interplab.rl.windows.cache_trajectories` rows: one row per (step, token kind) of the
window ending at that step, in the order of the trajectories' flat step axis (then the kinds, in `TOKEN_KINDS`
order), each with its episode, step and kind. SAEs train on them through `interplab.sae.train_saes` (the
in-memory `TensorActivations`); the feature database is built through `interplab.features.build.write_feature_db`
with the same statistics as a language model's (exact top-k, samples, histogram, co-occurrence, logit effects
onto the action head, and the first-order effect of each firing on the step's action loss). Its "corpus" is one
sequence per episode of the cached rows, so a context's window holds the rows of the steps before it in its
episode (what the model saw); a row's "token" says what it is (`ROW_VOCAB`: ``s→left`` for the state token of a
step whose action was left, ``R`` a return token, ``a:left`` an action token), and the table
`interplab.features.schema.dt_rows` records each row's episode, step, kind, action and return-to-go. The
database's ``meta["dt"]`` names the trajectory folder, the model, the site and the kinds.

>>> acts = dt_activations(dt, trajs, default_site(dt))            # the state tokens of the last layer
>>> acts.x.shape                                                   # [rows, d_model]
torch.Size([115, 32])
>>> sae = train_dt_sae(acts, d_sae=16, k=2, steps=20).saes["sae"]
>>> report = build_dt_feature_db("dt-features.db", dt, sae, acts, trajs)
>>> report.n_features
16
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.features.build import BuildReport, _fingerprint, write_feature_db
from interplab.features.collect import decoder_directions, decoder_logit_effects
from interplab.features.config import FeatureBuildConfig
from interplab.features.stream import FeatureStats, StreamingFeatureStats
from interplab.features.writer import FeatureWriter
from interplab.hooks.site import Site, SiteKind
from interplab.rl.envs import ACTION_NAMES
from interplab.rl.model import TOKEN_KINDS, DecisionTransformer
from interplab.rl.trajectories import Trajectories
from interplab.rl.windows import TrajectoryCache, cache_trajectories, to_tensor, token_position, windows
from interplab.sae import SAE, Architecture, SAEConfig, SAETrainConfig, SAETrainResult, create_sae, train_saes
from interplab.sae.activations import TensorActivations

__all__ = [
    "DT_META",
    "ROW_VOCAB",
    "DTActivations",
    "LabelScore",
    "build_dt_feature_db",
    "default_site",
    "dt_activations",
    "dt_feature_meta",
    "encode_rows",
    "env_variables",
    "feature_aurocs",
    "label_scores",
    "row_tokens",
    "step_features",
    "train_dt_sae",
]

DT_META = "dt"
"""the ``meta`` key of a decision transformer's feature database (absent from a language model's)"""
N_ACTIONS = len(ACTION_NAMES)
ROW_VOCAB: tuple[str, ...] = (
    *(f"a:{a} " for a in ACTION_NAMES),
    *(f"s→{a} " for a in ACTION_NAMES),
    "R ",
)
"""the "tokens" of a DT feature database: ids 0..6 the action tokens (so the logit effects onto the action
head name them), 7..13 the state token of a step by the action taken there, 14 a return token"""
RTG_TOKEN = 2 * N_ACTIONS


def default_site(model: DecisionTransformer, layer: int | None = None) -> str:
    """``blocks.L.hook_resid_post`` of ``layer`` (default the last), checked against the model."""
    n = model.cfg.n_layers
    layer = n - 1 if layer is None else layer
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} out of range: the model has layers 0..{n - 1}")
    return Site(SiteKind.RESID_POST, layer).name


@dataclass(frozen=True)
class DTActivations:
    """A decision transformer's activations at one site over trajectories, one row per (step, token kind)."""

    cache: TrajectoryCache
    """the rows and their episode, step, flat step and kind (`cache_trajectories`)"""
    site: str
    kinds: tuple[str, ...]
    """the token kinds cached per step, in sequence order"""
    tokens: Int[Tensor, " rows"]
    """each row's id in `ROW_VOCAB`"""
    action: Int[Tensor, " rows"]
    """the action taken at the row's step"""
    rtg: Float[Tensor, " rows"]
    """the return-to-go at the row's step"""
    row_starts: Int[Tensor, " episodes_plus_1"]
    """episode e's rows are ``row_starts[e]:row_starts[e + 1]``"""
    loss_grad: Float[Tensor, "rows d"] | None = None
    """the gradient of the step's action loss (cross-entropy of the action taken, read at its state token)
    with respect to the site at the row (zero where the row cannot influence it: the step's action token)"""

    @property
    def x(self) -> Float[Tensor, "rows d"]:
        return self.cache[self.site]

    @property
    def n_rows(self) -> int:
        return int(self.tokens.numel())

    @property
    def n_episodes(self) -> int:
        return int(self.row_starts.numel()) - 1

    def rows(self, kind: str | None = None) -> Tensor:
        """Indices of the rows of one token kind (all rows if None)."""
        return self.cache.rows(kind)

    def __repr__(self) -> str:
        return f"DTActivations({self.site} at {'/'.join(self.kinds)} tokens: {self.n_rows} rows, {self.n_episodes} episodes)"


def row_tokens(kind: Tensor, action: Tensor) -> Int[Tensor, " rows"]:
    """`ROW_VOCAB` ids of rows given their kind (index into `TOKEN_KINDS`) and their step's action."""
    a = action.long().clamp(0, N_ACTIONS - 1)
    state, act = TOKEN_KINDS.index("state"), TOKEN_KINDS.index("action")
    return torch.where(kind == state, N_ACTIONS + a, torch.where(kind == act, a, RTG_TOKEN))


def dt_activations(
    model: DecisionTransformer,
    trajs: Trajectories,
    site: str | Site | tuple | None = None,
    *,
    kinds: Sequence[str] = ("state",),
    loss_grad: bool = False,
    batch_size: int = 256,
) -> DTActivations:
    """Cache ``site`` (default: the last layer's ``hook_resid_post``) at the ``kinds`` tokens of every step
    (the window ending at the step, `cache_trajectories`), with each row's `ROW_VOCAB` token, action and
    return-to-go; with ``loss_grad`` also the gradient of each step's action loss at the rows."""
    name = default_site(model) if site is None else Site.parse(site).name
    ordered = tuple(k for k in TOKEN_KINDS if k in kinds)
    bad = [k for k in kinds if k not in TOKEN_KINDS]
    if bad or not ordered:
        raise ValueError(f"kinds must be a non-empty subset of {TOKEN_KINDS}, got {list(kinds)}")
    cache = cache_trajectories(model, trajs, [name], kinds=ordered, batch_size=batch_size)
    actions = to_tensor(trajs.actions, torch.long)[cache.flat_step]
    starts = to_tensor(trajs.episode_starts, torch.long)
    return DTActivations(
        cache=cache,
        site=name,
        kinds=ordered,
        tokens=row_tokens(cache.kind, actions),
        action=actions,
        rtg=to_tensor(trajs.rtg, torch.float32)[cache.flat_step],
        row_starts=starts * len(ordered),
        loss_grad=_action_loss_grads(model, trajs, name, ordered, batch_size) if loss_grad else None,
    )


def _action_loss_grads(
    model: DecisionTransformer, trajs: Trajectories, site: str, kinds: tuple[str, ...], batch_size: int
) -> Tensor:
    """d(cross-entropy of the step's action at its state token) / d(site) at the last step's ``kinds`` tokens
    of every window, rows ordered as `cache_trajectories` orders them."""
    win = windows(trajs, model.cfg.context)
    pos = torch.tensor([token_position(win.steps - 1, k) for k in kinds])
    dev = model.transformer.W_E.device
    out = []
    for batch in win.batches(batch_size):
        held: dict[str, Tensor] = {}

        def leaf(x: Tensor, _site: Site, held: dict[str, Tensor] = held) -> Tensor:
            held["x"] = x.detach().requires_grad_(True)
            return held["x"]

        with torch.enable_grad(), model.transformer.hooks(fwd_hooks=[(site, leaf)]):
            logits = model(*batch.inputs(dev))[:, -1].float()
            loss = F.cross_entropy(logits, batch.actions[:, -1].to(dev), reduction="sum")
            (grad,) = torch.autograd.grad(loss, held["x"])
        g = grad[:, pos.to(grad.device)].float().cpu()
        out.append(g.reshape(g.shape[0] * g.shape[1], -1))
    return torch.cat(out)


# ---- SAEs ------------------------------------------------------------------------------------------
def train_dt_sae(
    acts: DTActivations,
    *,
    d_sae: int = 256,
    architecture: str = "topk",
    k: int | None = 8,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 1e-3,
    seed: int = 0,
    name: str = "sae",
    run_dir: str | Path | None = None,
    data: dict[str, Any] | None = None,
    progress: Callable[[Any], None] | None = None,
) -> SAETrainResult:
    """One SAE on the cached rows, trained by `interplab.sae.train_saes` (as many passes over the rows as
    ``steps`` batches need, reshuffled each pass). ``run_dir`` makes it an SAE training run folder."""
    x = acts.x.float()
    if acts.n_rows < 2:
        raise ValueError(f"an SAE needs at least 2 rows of activations, got {acts.n_rows}")
    batch = min(batch_size, acts.n_rows)
    epochs = -(-steps * batch // acts.n_rows) + 1
    arch = Architecture.parse(architecture)
    cfg = SAEConfig(
        d_in=x.shape[1],
        d_sae=d_sae,
        architecture=arch,
        k=k if arch in (Architecture.TOPK, Architecture.BATCHTOPK, Architecture.MATRYOSHKA) else None,
        hook_name=acts.site,
    )
    sae = create_sae(cfg, seed=seed)
    train_cfg = SAETrainConfig(
        total_steps=steps, lr=lr, seed=seed, warmup_steps=min(100, steps // 10), log_every=max(1, steps // 40)
    )
    batches = TensorActivations({acts.site: x}, batch_size=batch, epochs=epochs, seed=seed)
    return train_saes({name: sae}, batches, train_cfg, run_dir=run_dir, data=data, progress=progress)


@torch.no_grad()
def encode_rows(sae: SAE, x: Tensor, batch_size: int = 8192) -> Float[Tensor, "rows d_sae"]:
    """The SAE's feature activations of every row (float32, on the CPU)."""
    out = [
        sae.encode(x[i : i + batch_size].to(sae.W_enc.device)).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, sae.cfg.d_sae)


# ---- the feature database ----------------------------------------------------------------------------
def _check_sae(model: DecisionTransformer, sae: SAE, acts: DTActivations) -> None:
    if sae.cfg.hook_name and sae.cfg.hook_name != acts.site:
        raise ValueError(f"the SAE reads {sae.cfg.hook_name!r}, the activations are of {acts.site!r}")
    if sae.cfg.d_in != acts.x.shape[1]:
        raise ValueError(
            f"the SAE has d_in={sae.cfg.d_in}, the activations at {acts.site} have width {acts.x.shape[1]}: "
            "an SAE of another model or site"
        )
    if acts.site not in model.transformer.hook_names:
        raise ValueError(f"{acts.site!r} is not a hook point of this model")


def build_dt_feature_db(
    path: str | Path,
    model: DecisionTransformer,
    sae: SAE,
    acts: DTActivations,
    trajs: Trajectories,
    cfg: FeatureBuildConfig | None = None,
    *,
    data_path: str | Path | None = None,
    model_path: str | Path | None = None,
    sae_path: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> BuildReport:
    """The feature database of ``sae`` over the cached rows ``acts`` (of ``model`` on ``trajs``), through
    `write_feature_db`: one streaming pass per range of features, each episode one sequence of rows. ``cfg``
    defaults to a window of the ``context - 1`` steps before a row and one after, the 3 most promoted and
    suppressed actions as logit effects; the loss effect is the
    first-order change of the step's action loss (needs ``acts.loss_grad``). ``data_path``: the trajectory
    folder the web app draws the states from (recorded in ``meta["dt"]``)."""
    _check_sae(model, sae, acts)
    n_kinds = len(acts.kinds)
    if cfg is None:
        cfg = FeatureBuildConfig(
            window_left=n_kinds * (model.cfg.context - 1),
            window_right=n_kinds,
            loss_effect=acts.loss_grad is not None,
            logit_k=3,  # of the 7 actions: the 3 most promoted, the 3 most suppressed
        )
    if cfg.loss_effect and acts.loss_grad is None:
        raise ValueError("loss_effect needs the action-loss gradients: dt_activations(..., loss_grad=True)")
    if acts.n_rows != int(acts.row_starts[-1]):
        raise ValueError(
            f"the activations have {acts.n_rows} rows, their episodes {int(acts.row_starts[-1])}"
        )
    x = acts.x
    grads = acts.loss_grad
    n_ep = acts.n_episodes

    def collect(
        feats: Tensor, state: StreamingFeatureStats, checkpoint: Callable, report: Callable
    ) -> FeatureStats:
        directions = decoder_directions(sae, feats) if cfg.loss_effect else None
        for e in range(state.batches, n_ep):  # a resumed pass skips the episodes it has seen
            lo, hi = int(acts.row_starts[e]), int(acts.row_starts[e + 1])
            a = encode_rows(sae, x[lo:hi])[:, feats]
            g = grads[lo:hi][None] if grads is not None and cfg.loss_effect else None
            state.update(acts.tokens[lo:hi][None], a[None], g, directions)
            if cfg.checkpoint_every and state.batches % cfg.checkpoint_every == 0:
                checkpoint(state)
            report(state.batches, n_ep)
        return state.result()

    def effects(feats: Tensor) -> Tensor | None:
        return (
            decoder_logit_effects(model.transformer, sae, feats)
            if sae.cfg.d_in == model.cfg.d_model
            else None
        )

    counts = torch.bincount(acts.tokens, minlength=len(ROW_VOCAB))
    dt_meta = {
        "env": trajs.env,
        "source": trajs.source,
        "trajectories": str(Path(data_path).resolve()) if data_path is not None else None,
        "model": str(Path(model_path).resolve()) if model_path is not None else None,
        "site": acts.site,
        "kinds": list(acts.kinds),
        "context": model.cfg.context,
        "n_episodes": n_ep,
        "n_steps": int(trajs.n_steps),
    }
    fingerprint = {**_fingerprint(model.transformer, sae, cfg, acts.n_rows), "dt": dt_meta}

    def rows(store: FeatureWriter) -> None:
        c = acts.cache
        store.write_dt_rows(
            [
                {
                    "token_index": i,
                    "episode": e,
                    "step": s,
                    "flat_step": f,
                    "token_kind": TOKEN_KINDS[k],
                    "action": a,
                    "rtg": r,
                }
                for i, (e, s, f, k, a, r) in enumerate(
                    zip(
                        c.episode.tolist(),
                        c.step.tolist(),
                        c.flat_step.tolist(),
                        c.kind.tolist(),
                        acts.action.tolist(),
                        acts.rtg.tolist(),
                        strict=True,
                    )
                )
            ]
        )

    return write_feature_db(
        path,
        sae,
        cfg,
        fingerprint=fingerprint,
        meta={
            "seq_len": None,
            "model_path": None,  # not a language model: the steering and attention views do not apply
            "sae_path": str(Path(sae_path).resolve()) if sae_path is not None else None,
            DT_META: dt_meta,
        },
        vocab=list(ROW_VOCAB),
        counts=counts.tolist(),
        collect=collect,
        logit_effects=effects,
        on_create=rows,
        overwrite=overwrite,
        progress=progress,
    )


def dt_feature_meta(meta: dict[str, Any], where: str = "the feature database") -> dict[str, Any]:
    """A DT feature database's ``meta["dt"]`` record, or a clear error for a language model's database."""
    dt = meta.get(DT_META)
    if not isinstance(dt, dict):
        raise ValueError(
            f"{where} holds a language model's features (no {DT_META!r} record): a decision transformer's "
            "feature database is built by `interplab dt sae`"
        )
    return dt


# ---- per-step read-outs and environment variables -------------------------------------------------------
def step_features(
    feature_acts: Tensor, acts: DTActivations, episodes: Sequence[int], *, k: int = 5, kind: str | None = None
) -> dict[str, list[list[list[float]]]]:
    """For each step of ``episodes``: the ``k`` most active features at its ``kind`` row (default the state
    token if cached, else the first kind) as ``[feature, activation]`` pairs, strongest first (firing only)."""
    kind = kind or ("state" if "state" in acts.kinds else acts.kinds[0])
    if kind not in acts.kinds:
        raise ValueError(f"kind {kind!r} is not cached; cached: {list(acts.kinds)}")
    offset, n_kinds = acts.kinds.index(kind), len(acts.kinds)
    out = {}
    for e in episodes:
        lo, hi = int(acts.row_starts[e]), int(acts.row_starts[e + 1])
        rows = feature_acts[lo + offset : hi : n_kinds]
        vals, idx = rows.topk(min(k, rows.shape[1]), dim=1)
        out[str(e)] = [
            [[int(f), round(float(v), 4)] for f, v in zip(fi, vi, strict=True) if v > 0]
            for fi, vi in zip(idx.tolist(), vals.tolist(), strict=True)
        ]
    return out


def env_variables(labels: Any) -> dict[str, Bool[Tensor, " steps"]]:
    """Binary environment variables per step from `interplab.rl.labels.EnvLabels`, each with its complement
    (a feature may detect either: the absence of a key that is usually in view is the sparse event): a key /
    ball in view or not, the agent facing east/south/west/north and, on MemoryS*, the instruction object (key or
    ball), the instruction in view or not and the side of the matching object (north or south)."""
    out: dict[str, Tensor] = {}

    def both(name: str, yes: Tensor, no: str) -> None:
        out[name], out[no] = yes.bool(), ~yes.bool()

    both("key_in_view", labels.key_in_view, "no_key_in_view")
    both("ball_in_view", labels.ball_in_view, "no_ball_in_view")
    for d, name in enumerate(("east", "south", "west", "north")):
        out[f"facing_{name}"] = labels.direction == d
    if labels.instruction is not None:
        both("instruction_ball", labels.instruction == 1, "instruction_key")
    if labels.instruction_in_view is not None:
        both("instruction_in_view", labels.instruction_in_view, "instruction_not_in_view")
    if labels.target_side is not None:
        both("target_south", labels.target_side == 1, "target_north")
    return out


def feature_aurocs(feature_acts: Float[Tensor, "rows d_sae"], label: Bool[Tensor, " rows"]) -> Tensor:
    """Each feature's AUROC for ``label``: P(activation on a positive row > on a negative row), ties half
    (the Mann-Whitney statistic, exact). NaN where the label has one class only."""
    y = label.bool()
    pos, neg = feature_acts[y].T.float(), feature_acts[~y].T.float().contiguous()  # feature x rows
    if pos.shape[1] == 0 or neg.shape[1] == 0:
        return torch.full((feature_acts.shape[1],), float("nan"))
    neg_sorted = neg.sort(dim=1).values
    below = torch.searchsorted(neg_sorted, pos.contiguous(), right=False).double()
    ties = torch.searchsorted(neg_sorted, pos.contiguous(), right=True).double() - below
    return ((below + 0.5 * ties).sum(1) / (pos.shape[1] * neg.shape[1])).float()


@dataclass(frozen=True)
class LabelScore:
    """The feature that best detects one binary environment variable."""

    label: str
    feature: int
    auroc: float
    positives: float
    """the label's share of the rows"""
    density: float
    """the feature's firing share of the rows"""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def label_scores(
    feature_acts: Tensor, acts: DTActivations, variables: dict[str, Tensor], *, kind: str | None = None
) -> list[LabelScore]:
    """Per variable (a bool per flat step, `env_variables`): the feature with the highest AUROC on the ``kind``
    rows (default the state token if cached), skipping variables with one class there."""
    kind = kind or ("state" if "state" in acts.kinds else acts.kinds[0])
    rows = acts.rows(kind)
    fa = feature_acts[rows]
    out = []
    for name, v in variables.items():
        y = torch.as_tensor(v).bool()[acts.cache.flat_step[rows]]
        if bool(y.all()) or not bool(y.any()):
            continue
        au = torch.nan_to_num(feature_aurocs(fa, y), nan=0.0)
        best = int(au.argmax())
        out.append(
            LabelScore(
                label=name,
                feature=best,
                auroc=round(float(au[best]), 4),
                positives=round(float(y.float().mean()), 4),
                density=round(float((fa[:, best] > 0).float().mean()), 4),
            )
        )
    return out
