"""Activations cached on disk: safetensors shards plus a ``manifest.json``, written resumably and read back
shuffled across shards through memory maps (never loading the whole cache).

Layout of a cache folder::

    manifest.json               {kind, version, model, identity, hooks: {name: d}, dtype,
                                 shards: [{file, rows, token_batches, tokens_sha256, size, sha256}], complete}
    shard_00000.safetensors     one [rows, d] tensor per hook, rows aligned across hooks

A shard is written atomically and only then recorded in the manifest (also atomic), so a run killed at any
moment leaves a consistent cache; `cache_activations` with the same inputs resumes after the last recorded
shard (it skips the token batches already consumed), with no duplicated or lost rows. ``identity`` holds
everything that determines the rows (model weights fingerprint, hooks, dtype, token filter, row budget, the
caller's data description) and each shard the running SHA-256 of the token batches consumed so far: a resume
with anything different is refused, naming the difference, so a cache never mixes rows of two sources. Each
shard's size and SHA-256 are checked the first time a reader maps it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from interplab.hooks import Site
from interplab.integrity import IntegrityError, check_file, file_record, module_fingerprint
from interplab.io import save_tensors
from interplab.runs import MANIFEST, VERSIONS, CacheRun, Kind, write_json
from interplab.sae.activations import ActivationBatch, TokenFilter, _as_batch, model_activations
from interplab.train import distributed

if TYPE_CHECKING:
    from interplab.model import Transformer

KIND = Kind.ACTIVATION_CACHE
STORE_VERSION = VERSIONS[KIND]
_READS = (1, 2)  # version 1 caches (no identity, no checksums) are still read, never resumed
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
RANKS = "ranks"  # the rank folders of a cache written by several processes
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ActivationDataError(ValueError):
    """Activations that cannot be used (NaN/inf, wrong width); the message names the shard and row."""


@dataclass(frozen=True)
class CacheResult:
    """What `cache_activations` wrote."""

    path: Path
    rows: int
    shards: int
    bytes_on_disk: int
    resumed_from_shard: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_on_disk / max(self.rows, 1)


def cache_activations(
    model: Transformer,
    token_batches: Iterable[Tensor],
    hooks: Sequence[str],
    path: str | Path,
    *,
    dtype: str = "float32",
    shard_rows: int = 65536,
    token_filter: TokenFilter = TokenFilter(),
    max_rows: int | None = None,
    source: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    rank: int | None = None,
    world: int | None = None,
) -> CacheResult:
    """Run ``model`` over ``token_batches`` and write activations at ``hooks`` to ``path`` in shards of about
    ``shard_rows`` rows, stored as ``dtype`` (float32, float16 or bfloat16).

    The manifest records everything that determines the rows: the model's weights fingerprint, the hooks, the
    dtype, the token filter, ``max_rows``, the caller's ``source`` (JSON-able: corpus fingerprint, split,
    seq_len, seed ...) and a running SHA-256 of the token batches each shard consumed. An unfinished cache is
    resumed only when all of these agree (``token_batches`` must yield the same batches in the same order); any
    difference is refused, naming it. ``overwrite=True`` deletes an existing cache and starts again.

    Under torchrun (or with ``rank`` and ``world``) every rank caches its share of the token batches
    (`rank_token_batches`: every ``world``-th batch, the same set one process would cache) into its own
    resumable folder ``ranks/rank_R_of_W/``, and rank 0 writes the manifest of the whole cache: the same rows
    as one process writes, each once. An unfinished cache is resumed by the same number of processes only (the
    error says how to finish it); a finished one is read by any number."""
    if dtype not in _TORCH:
        raise ValueError(f"unknown cache dtype {dtype!r}; valid: {sorted(_TORCH)}")
    path = Path(path)
    names = [_canon(h) for h in hooks]
    wanted = {
        "hooks": names,
        "dtype": dtype,
        "model": module_fingerprint(model),
        "token_filter": dataclasses.asdict(token_filter),
        "max_rows": max_rows,
        **{f"source.{k}": v for k, v in json.loads(json.dumps(dict(source or {}), default=str)).items()},
    }
    r, world = _rank_world(rank, world)
    if world > 1 or (path / RANKS).is_dir():
        return _cache_sharded(
            model, token_batches, names, path, wanted, r, world,
            dtype=dtype, shard_rows=shard_rows, token_filter=token_filter, max_rows=max_rows,
            model_name=model_name, overwrite=overwrite, progress=progress,
        )  # fmt: skip
    return _write_cache(
        model, token_batches, names, path, wanted,
        dtype=dtype, shard_rows=shard_rows, token_filter=token_filter, max_rows=max_rows,
        model_name=model_name, overwrite=overwrite, progress=progress,
    )  # fmt: skip


def _write_cache(
    model: Transformer,
    token_batches: Iterable[Tensor],
    names: list[str],
    path: Path,
    wanted: dict[str, Any],
    *,
    dtype: str,
    shard_rows: int,
    token_filter: TokenFilter,
    max_rows: int | None,
    model_name: str | None,
    overwrite: bool,
    progress: Callable[[int], None] | None,
) -> CacheResult:
    """One process writes the cache at ``path`` (a rank writes its own folder, `_cache_sharded`)."""
    manifest = _existing_cache(path, overwrite)
    if manifest is not None:
        _check_same_cache(path, manifest, wanted)
    else:
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "kind": KIND.value,
            "version": STORE_VERSION,
            "model": {"name": model_name or getattr(getattr(model, "cfg", None), "name", None)},
            "identity": wanted,
            "hooks": {},
            "dtype": dtype,
            "shards": [],
            "complete": False,
        }
    resumed = len(manifest["shards"])
    skip = sum(s["token_batches"] for s in manifest["shards"])
    rows_done = sum(s["rows"] for s in manifest["shards"])
    token_hash = hashlib.sha256()
    pending: dict[str, list[Tensor]] = {}
    pending_rows = pending_batches = 0
    tdt = _TORCH[dtype]

    def flush() -> None:
        nonlocal pending, pending_rows, pending_batches, rows_done
        if pending_rows == 0:
            return
        index = len(manifest["shards"])
        file = f"shard_{index:05d}.safetensors"
        tensors = {h: torch.cat(v) for h, v in pending.items()}
        save_tensors(path / file, tensors)
        manifest["shards"].append(
            {
                "file": file,
                "rows": pending_rows,
                "token_batches": pending_batches,
                "tokens_sha256": token_hash.hexdigest(),
                **file_record(path / file),
            }
        )
        write_json(path / MANIFEST, KIND, manifest)
        rows_done += pending_rows
        pending, pending_rows, pending_batches = {}, 0, 0

    seen = 0
    for i, toks in enumerate(token_batches):
        toks = _as_batch(toks)
        if i < skip:
            _hash_tokens(token_hash, toks)
            seen = i + 1
            if seen == skip:
                _check_same_tokens(path, manifest, token_hash.hexdigest(), skip)
            continue
        if max_rows is not None and rows_done + pending_rows >= max_rows:
            break
        seen = i + 1
        _hash_tokens(token_hash, toks)
        acts = model_activations(model, toks, names, token_filter=token_filter)
        for h, a in acts.items():
            _check_finite(a, f"model activations at {h} for token batch {i}", 0)
            manifest["hooks"][h] = int(a.shape[-1])
            pending.setdefault(h, []).append(a.to(tdt))
        pending_rows += next(iter(acts.values())).shape[0]
        pending_batches += 1
        if progress is not None:
            progress(rows_done + pending_rows)
        if pending_rows >= shard_rows:
            flush()
    if seen < skip:
        raise ValueError(
            f"the cache at {path} consumed {skip} token batches, but this run yields only {seen}: "
            "it is not the same data; use another folder, or overwrite=True (--overwrite) to start again"
        )
    flush()
    manifest["complete"] = True
    write_json(path / MANIFEST, KIND, manifest)
    size = sum((path / s["file"]).stat().st_size for s in manifest["shards"])
    return CacheResult(
        path=path,
        rows=rows_done,
        shards=len(manifest["shards"]),
        bytes_on_disk=size,
        resumed_from_shard=resumed,
    )


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """(rank, world): the running process group's unless given (both or neither), checked."""
    if (rank is None) != (world is None):
        raise ValueError(f"give both rank and world, or neither (got rank={rank}, world={world})")
    if rank is None or world is None:
        return distributed.rank(), distributed.world_size()
    distributed.shard_of(0, rank, world)  # checks them
    return rank, world


def rank_folder(path: str | Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its part of the cache at ``path`` (a cache of its own)."""
    return Path(path) / RANKS / f"rank_{rank:05d}_of_{world:05d}"


def _worlds_in(path: Path) -> set[int]:
    """The world sizes of the rank folders under ``path/ranks`` (an unfinished sharded cache)."""
    folder = path / RANKS
    found = set()
    for p in folder.iterdir() if folder.is_dir() else ():
        _, _, of = p.name.rpartition("_of_")
        if p.name.startswith("rank_") and of.isdigit():
            found.add(int(of))
    return found


def rank_token_batches(
    token_batches: Iterable[Tensor], token_filter: TokenFilter, max_rows: int | None, rank: int, world: int
) -> Iterator[Tensor]:
    """Rank ``rank``'s share of the token stream one process would cache: every ``world``-th token batch from
    ``rank``, among the batches one process would take under ``max_rows`` (its stopping point is computed from
    the token filter, without running the model). Together the ranks take each of those batches once."""
    rows = 0
    for i, toks in enumerate(token_batches):
        if max_rows is not None and rows >= max_rows:
            return
        toks = _as_batch(toks)
        if i % world == rank:
            yield toks
        rows += int(token_filter.mask(toks).sum())


def _cache_sharded(
    model: Transformer,
    token_batches: Iterable[Tensor],
    names: list[str],
    path: Path,
    wanted: dict[str, Any],
    rank: int,
    world: int,
    *,
    dtype: str,
    shard_rows: int,
    token_filter: TokenFilter,
    max_rows: int | None,
    model_name: str | None,
    overwrite: bool,
    progress: Callable[[int], None] | None,
) -> CacheResult:
    """Every rank caches its share of the token batches (`rank_token_batches`) into its own resumable folder
    (`rank_folder`); rank 0 then writes the one ``manifest.json`` listing every rank's shards."""
    error: BaseException | None = None
    done = 0
    if rank == 0:
        try:
            done = int(_prepare_sharded(path, wanted, world, overwrite))
        except (ValueError, OSError) as err:
            error = err
    distributed.agree(error, f"the check of the cache folder {path}")
    if distributed.from_rank0(done):
        return _result(path, resumed=len(_read_manifest(path)["shards"]))
    sub = rank_folder(path, rank, world)
    if rank != 0:
        path.mkdir(parents=True, exist_ok=True)
    mine = rank_token_batches(token_batches, token_filter, max_rows, rank, world)
    try:
        res = _write_cache(
            model, mine, names, sub, {**wanted, "rank": rank, "world": world},
            dtype=dtype, shard_rows=shard_rows, token_filter=token_filter, max_rows=None,
            model_name=model_name, overwrite=False,
            progress=None if progress is None else (lambda n: progress(n * world)),
        )  # fmt: skip
    except (ValueError, OSError) as err:
        error = err
    distributed.agree(error, f"writing its part of the cache {path}")
    if rank == 0:
        _merge_ranks(path, world, model_name)
    distributed.barrier(f"the merge of the cache {path}")
    if not (path / MANIFEST).is_file():  # ranks simulated in one process (no group): rank 0 merges last
        return res
    return _result(path, resumed=res.resumed_from_shard)


def _prepare_sharded(path: Path, wanted: dict[str, Any], world: int, overwrite: bool) -> bool:
    """Rank 0, before any rank writes: True if ``path`` already holds this finished cache. Refuses an
    unfinished cache being written by another number of processes, saying how to finish it."""
    if overwrite and path.is_dir():
        if (path / RANKS).is_dir():
            shutil.rmtree(path / RANKS)
        _existing_cache(path, overwrite=True)
        return False
    manifest = _read_manifest(path) if (path / MANIFEST).is_file() else None
    if manifest is not None:
        _check_same_cache(path, manifest, wanted)
        if manifest.get("complete"):
            return True  # a finished cache is read by any number of processes
        if world > 1:
            raise ValueError(
                f"the unfinished cache at {path} is being written by one process: finish it with the same "
                f"command without torchrun, or --overwrite (overwrite=True) to start again with {world} processes"
            )
    worlds = _worlds_in(path)
    if worlds and worlds != {world}:
        was = max(worlds)
        raise ValueError(
            f"the unfinished cache at {path} is being written by {was} processes ({path / RANKS}/rank_*_of_"
            f"{was:05d}); this run has {world}: finish it with the same command under torchrun with {was} "
            f"processes in all (--nnodes x --nproc_per_node = {was}), or --overwrite (overwrite=True) to start "
            f"again with {world}"
        )
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a cache folder: choose another output folder")
    if path.is_dir() and not worlds:
        strangers = [p for p in path.iterdir() if p.name != RANKS and not _ours(p)]
        if strangers:
            raise ValueError(f"{path} is not empty and is not an activation cache: choose another folder")
    path.mkdir(parents=True, exist_ok=True)
    return False


def _merge_ranks(path: Path, world: int, model_name: str | None) -> None:
    """Rank 0: the manifest of the whole cache, every rank's shards in rank order (paths relative to ``path``)."""
    parts = [_read_manifest(rank_folder(path, r, world)) for r in range(world)]
    shards = []
    for r, part in enumerate(parts):
        rel = rank_folder(path, r, world).relative_to(path).as_posix()
        shards += [{**sh, "file": f"{rel}/{sh['file']}", "rank": r} for sh in part["shards"]]
    identity = {k: v for k, v in parts[0]["identity"].items() if k not in ("rank", "world")}
    hooks: dict[str, int] = {}
    for part in parts:
        hooks.update(part["hooks"])
    manifest = {
        "kind": KIND.value,
        "version": STORE_VERSION,
        "model": parts[0]["model"] if model_name is None else {"name": model_name},
        "identity": identity,
        "hooks": hooks,
        "dtype": parts[0]["dtype"],
        "shards": shards,
        "world": world,
        "complete": True,
    }
    write_json(path / MANIFEST, KIND, manifest)


def _result(path: Path, resumed: int) -> CacheResult:
    manifest = _read_manifest(path)
    shards = manifest["shards"]
    return CacheResult(
        path=path,
        rows=sum(s["rows"] for s in shards),
        shards=len(shards),
        bytes_on_disk=sum((path / s["file"]).stat().st_size for s in shards),
        resumed_from_shard=resumed,
    )


def _existing_cache(path: Path, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of the cache at ``path`` to resume (None: start a new one). Never deletes what is not a cache."""
    if not path.exists():
        return None
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a cache folder: choose another output folder")
    if not (path / MANIFEST).is_file():
        # a run killed before its first manifest write leaves only its own shard / temp files: start again
        entries = list(path.iterdir())
        if any(not _ours(p) for p in entries):
            raise ValueError(f"{path} is not empty and is not an activation cache: choose another folder")
        for p in entries:
            p.unlink()
        return None
    manifest = _read_manifest(path)
    if not overwrite:
        return manifest
    for file in path.iterdir():
        if file.name == MANIFEST or _ours(file):
            file.unlink()
    return None


def _ours(file: Path) -> bool:
    """A shard, or the temp file of an interrupted atomic write."""
    shard = file.name.startswith("shard_") and file.suffix == ".safetensors"
    return file.is_file() and (shard or (file.name.startswith(".") and file.name.endswith(".tmp")))


def _check_same_cache(path: Path, manifest: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to resume a cache written from other inputs, naming the first difference."""
    old = manifest.get("identity")
    if old is None:
        raise ValueError(
            f"the cache at {path} was written by an older interplab that did not record its model and data, "
            "so it cannot be resumed safely; use another folder, or overwrite=True (--overwrite) to start again"
        )
    for key in [*wanted, *(k for k in old if k not in wanted)]:  # the order of importance given
        if old.get(key) != wanted.get(key):
            name = key.removeprefix("source.")
            what = "model weights (fingerprint)" if key == "model" else name
            raise ValueError(
                f"the cache at {path} was written with {what}={_show(old.get(key))}; this run asks for "
                f"{_show(wanted.get(key))}: use another folder (a new --out), or overwrite=True (--overwrite) "
                "to start again"
            )


def _check_same_tokens(path: Path, manifest: dict[str, Any], digest: str, skip: int) -> None:
    recorded = manifest["shards"][-1].get("tokens_sha256")
    if recorded is not None and recorded != digest:
        raise ValueError(
            f"the cache at {path} was written from other token batches (the first {skip} batches differ: "
            "another corpus, split, order or sequence length); use another folder, or overwrite=True "
            "(--overwrite) to start again"
        )


def _hash_tokens(h: Any, toks: Tensor) -> None:
    h.update(f"{tuple(toks.shape)}|".encode())
    h.update(toks.contiguous().numpy().tobytes())


def _show(value: Any) -> str:
    return "(not recorded)" if value is None else json.dumps(value) if not isinstance(value, str) else value


class DiskActivationStore:
    """Read a cache folder: shuffled batches across shards via memory maps, or plain row ranges."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.hooks: dict[str, int] = dict(self.manifest["hooks"])
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._verified: set[int] = set()

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def __repr__(self) -> str:
        return f"DiskActivationStore({str(self.path)!r}, rows={self.rows}, hooks={self.hooks}, dtype={self.manifest['dtype']})"

    def shard(self, index: int, hook: str) -> Tensor:
        """Shard ``index`` at ``hook`` as a [rows, d] tensor backed by a memory map (no copy)."""
        key = (index, hook)
        if key not in self._maps:
            file = self.path / self.shards[index]["file"]
            if index not in self._verified and "sha256" in self.shards[index]:
                problem = check_file(file, self.shards[index])  # once per shard and process
                if problem is not None:
                    raise IntegrityError(f"activation cache shard {file} {problem}")
                self._verified.add(index)
            self._maps[key] = _memmap(file, hook)
        with warnings.catch_warnings():  # the map is read-only; we never write through it
            warnings.simplefilter("ignore", UserWarning)
            arr = torch.from_numpy(self._maps[key])
        return arr.view(torch.bfloat16) if self.manifest["dtype"] == "bfloat16" else arr

    def batches(
        self,
        batch_size: int,
        *,
        hooks: Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int = 1,
        chunk_rows: int = 1024,
        mix_chunks: int = 64,
        dtype: torch.dtype = torch.float32,
        rank: int | None = None,
        world: int | None = None,
        start: int = 0,
    ) -> Iterator[ActivationBatch]:
        """Batches ``{hook: [batch_size, d]}``. Shuffling permutes chunks of ``chunk_rows`` rows across all
        shards, gathers ``mix_chunks`` chunks at a time and permutes their rows, so memory stays at
        ``chunk_rows * mix_chunks`` rows while every batch mixes many shards. NaN/inf raise
        `ActivationDataError` naming the shard and row.

        Under torchrun (or with ``rank`` and ``world``) ``batch_size`` is the global batch: each rank gets its
        contiguous ``batch_size // world`` rows of every batch one process would get, reading only those, so
        the ranks together read each row of the one-process stream exactly once (and a resume that skips the
        first n batches skips the same rows on every rank). ``start=n`` begins at batch n without reading the
        n before it (a resume: `SkippableBatches`)."""
        hooks = list(self.hooks) if hooks is None else [_canon(h) for h in hooks]
        for h in hooks:
            if h not in self.hooks:
                raise KeyError(f"{self.path} has no activations for {h!r}; it holds {list(self.hooks)}")
        rank, world = _rank_world(rank, world)
        if batch_size <= 0 or batch_size % world:
            lower, upper = batch_size // world * world, -(-batch_size // world) * world
            raise ValueError(
                f"batch size {batch_size} does not divide over {world} processes: each rank takes an equal part "
                f"of every batch; use a multiple of {world} (e.g. {lower or upper} or {upper})"
            )
        part = batch_size // world
        starts = [0]
        for sh in self.shards:
            starts.append(starts[-1] + sh["rows"])
        chunks = [
            (s, start, min(start + chunk_rows, sh["rows"]))
            for s, sh in enumerate(self.shards)
            for start in range(0, sh["rows"], chunk_rows)
        ]
        bounds = torch.tensor(starts[1:-1], dtype=torch.long)
        g = torch.Generator().manual_seed(seed)
        served = 0
        for _ in range(epochs):
            order = torch.randperm(len(chunks), generator=g).tolist() if shuffle else list(range(len(chunks)))
            carry = torch.zeros(0, dtype=torch.long)
            for group_start in range(0, len(order), mix_chunks):
                group = [chunks[i] for i in order[group_start : group_start + mix_chunks]]
                merged = torch.cat(
                    [carry] + [torch.arange(starts[s] + a, starts[s] + b) for s, a, b in group]
                )
                n = merged.shape[0]
                if shuffle:
                    merged = merged[torch.randperm(n, generator=g)]
                full = n // batch_size
                for i in range(full):
                    served += 1
                    if served <= start:
                        continue  # a resume: the index is kept in step, no row is read
                    lo = i * batch_size + rank * part
                    yield self._gather(merged[lo : lo + part], bounds, starts, hooks, dtype)
                carry = merged[full * batch_size :]

    def _gather(
        self, rows: Tensor, bounds: Tensor, starts: list[int], hooks: list[str], dtype: torch.dtype
    ) -> ActivationBatch:
        """The cache rows ``rows`` (global indices, in this order), read shard by shard in ascending order."""
        shard_of_row = torch.bucketize(rows, bounds, right=True)
        out = {h: torch.empty(rows.shape[0], self.hooks[h], dtype=dtype) for h in hooks}
        for s in shard_of_row.unique().tolist():
            where = (shard_of_row == s).nonzero().squeeze(1)
            local, order = (rows[where] - starts[s]).sort()
            dest = where[order]
            for h in hooks:
                block = self.shard(s, h)[local].to(dtype)
                if not torch.isfinite(block).all():
                    bad = int((~torch.isfinite(block)).reshape(block.shape[0], -1).any(-1).nonzero()[0, 0])
                    _check_finite(block[bad : bad + 1], f"{self.shards[s]['file']} ({h})", int(local[bad]))
                out[h][dest] = block
        return out

    def validate(self) -> None:
        """Scan every shard for NaN/inf and for rows/widths that disagree with the manifest."""
        for s, sh in enumerate(self.shards):
            for h, d in self.hooks.items():
                t = self.shard(s, h)
                if tuple(t.shape) != (sh["rows"], d):
                    raise ActivationDataError(
                        f"{sh['file']} ({h}) has shape {tuple(t.shape)}, manifest says {(sh['rows'], d)}"
                    )
                for start in range(0, sh["rows"], 65536):
                    _check_finite(t[start : start + 65536].float(), f"{sh['file']} ({h})", start)


def _check_finite(x: Tensor, where: str, row_offset: int) -> None:
    if torch.isfinite(x).all():
        return
    bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(-1).nonzero()[0, 0].item())
    value = x.reshape(x.shape[0], -1)[bad][~torch.isfinite(x.reshape(x.shape[0], -1)[bad])][0].item()
    raise ActivationDataError(f"non-finite activation ({value}) in {where}, row {row_offset + bad}")


def _canon(hook: str) -> str:
    return Site.parse(hook).name


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not an activation cache: no {MANIFEST}")
    manifest = CacheRun.open(path).manifest
    if manifest.get("version") not in _READS:
        raise ValueError(
            f"{file}: unsupported cache version {manifest.get('version')!r}; this interplab reads {list(_READS)}"
        )
    return manifest


def _memmap(file: Path, key: str) -> np.ndarray:
    """A read-only numpy memmap of tensor ``key`` inside a safetensors file (8-byte header length, JSON header,
    then raw little-endian data)."""
    size = file.stat().st_size if file.is_file() else None
    if size is None:
        raise FileNotFoundError(f"cache shard {file} is missing")
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (struct.error, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ActivationDataError(
            f"cache shard {file} ({size:,} bytes) has no readable header: truncated or damaged"
        )
    if key not in header:
        raise KeyError(f"{file} has no tensor {key!r}")
    info = header[key]
    start, stop = info["data_offsets"]
    if 8 + n + stop > size:
        raise ActivationDataError(
            f"cache shard {file} is truncated: {size:,} bytes, its header needs {8 + n + stop:,}"
        )
    return np.memmap(
        file, dtype=_NP[info["dtype"]], mode="r", offset=8 + n + start, shape=tuple(info["shape"])
    )
