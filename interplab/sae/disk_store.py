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

if TYPE_CHECKING:
    from interplab.model import Transformer

KIND = Kind.ACTIVATION_CACHE
STORE_VERSION = VERSIONS[KIND]
_READS = (1, 2)  # version 1 caches (no identity, no checksums) are still read, never resumed
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
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
) -> CacheResult:
    """Run ``model`` over ``token_batches`` and write activations at ``hooks`` to ``path`` in shards of about
    ``shard_rows`` rows, stored as ``dtype`` (float32, float16 or bfloat16).

    The manifest records everything that determines the rows: the model's weights fingerprint, the hooks, the
    dtype, the token filter, ``max_rows``, the caller's ``source`` (JSON-able: corpus fingerprint, split,
    seq_len, seed ...) and a running SHA-256 of the token batches each shard consumed. An unfinished cache is
    resumed only when all of these agree (``token_batches`` must yield the same batches in the same order); any
    difference is refused, naming it. ``overwrite=True`` deletes an existing cache and starts again."""
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
    ) -> Iterator[ActivationBatch]:
        """Batches ``{hook: [batch_size, d]}``. Shuffling permutes chunks of ``chunk_rows`` rows across all
        shards, gathers ``mix_chunks`` chunks at a time and permutes their rows, so memory stays at
        ``chunk_rows * mix_chunks`` rows while every batch mixes many shards. NaN/inf raise
        `ActivationDataError` naming the shard and row."""
        hooks = list(self.hooks) if hooks is None else [_canon(h) for h in hooks]
        for h in hooks:
            if h not in self.hooks:
                raise KeyError(f"{self.path} has no activations for {h!r}; it holds {list(self.hooks)}")
        chunks = [
            (s, start, min(start + chunk_rows, sh["rows"]))
            for s, sh in enumerate(self.shards)
            for start in range(0, sh["rows"], chunk_rows)
        ]
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(chunks), generator=g).tolist() if shuffle else list(range(len(chunks)))
            carry: dict[str, Tensor] | None = None
            for group_start in range(0, len(order), mix_chunks):
                group = [chunks[i] for i in order[group_start : group_start + mix_chunks]]
                parts = {h: [self._read(c, h, dtype) for c in group] for h in hooks}
                merged = {h: torch.cat(v) for h, v in parts.items()}
                if carry is not None:
                    merged = {h: torch.cat([carry[h], merged[h]]) for h in hooks}
                n = merged[hooks[0]].shape[0]
                if shuffle:
                    perm = torch.randperm(n, generator=g)
                    merged = {h: v[perm] for h, v in merged.items()}
                full = n // batch_size
                for i in range(full):
                    yield {h: v[i * batch_size : (i + 1) * batch_size] for h, v in merged.items()}
                carry = {h: v[full * batch_size :] for h, v in merged.items()}

    def _read(self, chunk: tuple[int, int, int], hook: str, dtype: torch.dtype) -> Tensor:
        s, start, stop = chunk
        block = self.shard(s, hook)[start:stop].to(dtype)
        _check_finite(block, f"{self.shards[s]['file']} ({hook})", start)
        return block

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
