"""Activations cached on disk: safetensors shards plus a ``manifest.json``, written resumably and read back
shuffled across shards through memory maps (never loading the whole cache).

Layout of a cache folder::

    manifest.json               {version, hooks: {name: d}, dtype, shards: [{file, rows, token_batches}], ...}
    shard_00000.safetensors     one [rows, d] tensor per hook, rows aligned across hooks

A shard is written atomically and only then recorded in the manifest (also atomic), so a run killed at any
moment leaves a consistent cache; `cache_activations` with the same inputs resumes after the last recorded
shard (it skips the token batches already consumed), with no duplicated or lost rows.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from interplab.io import atomic_write_json, save_tensors
from interplab.sae.activations import ActivationBatch, TokenFilter, _as_batch, model_activations

MANIFEST = "manifest.json"
STORE_VERSION = 1
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
    model: torch.nn.Module,
    token_batches: Iterable[Tensor],
    hooks: Sequence[str],
    path: str | Path,
    *,
    dtype: str = "float32",
    shard_rows: int = 65536,
    token_filter: TokenFilter = TokenFilter(),
    max_rows: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CacheResult:
    """Run ``model`` over ``token_batches`` and write activations at ``hooks`` to ``path`` in shards of about
    ``shard_rows`` rows, stored as ``dtype`` (float32, float16 or bfloat16). Resumes an unfinished cache
    made with the same hooks and dtype; ``token_batches`` must yield the same batches in the same order."""
    if dtype not in _TORCH:
        raise ValueError(f"unknown cache dtype {dtype!r}; valid: {sorted(_TORCH)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = list(hooks)
    manifest = _read_manifest(path) if (path / MANIFEST).exists() else None
    if manifest is not None:
        if list(manifest["hooks"]) != [_canon(h) for h in names] or manifest["dtype"] != dtype:
            raise ValueError(
                f"{path} holds a cache of {list(manifest['hooks'])} in {manifest['dtype']}; "
                f"asked for {names} in {dtype}: use another folder"
            )
    else:
        manifest = {"version": STORE_VERSION, "hooks": {}, "dtype": dtype, "shards": [], "complete": False}
    resumed = len(manifest["shards"])
    skip = sum(s["token_batches"] for s in manifest["shards"])
    rows_done = sum(s["rows"] for s in manifest["shards"])
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
        manifest["shards"].append({"file": file, "rows": pending_rows, "token_batches": pending_batches})
        atomic_write_json(path / MANIFEST, manifest)
        rows_done += pending_rows
        pending, pending_rows, pending_batches = {}, 0, 0

    for i, toks in enumerate(token_batches):
        if i < skip:
            continue
        if max_rows is not None and rows_done + pending_rows >= max_rows:
            break
        acts = model_activations(model, _as_batch(toks), names, token_filter=token_filter)
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
    flush()
    manifest["complete"] = True
    atomic_write_json(path / MANIFEST, manifest)
    size = sum((path / s["file"]).stat().st_size for s in manifest["shards"])
    return CacheResult(
        path=path,
        rows=rows_done,
        shards=len(manifest["shards"]),
        bytes_on_disk=size,
        resumed_from_shard=resumed,
    )


class DiskActivationStore:
    """Read a cache folder: shuffled batches across shards via memory maps, or plain row ranges."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.hooks: dict[str, int] = dict(self.manifest["hooks"])
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def __repr__(self) -> str:
        return f"DiskActivationStore({str(self.path)!r}, rows={self.rows}, hooks={self.hooks}, dtype={self.manifest['dtype']})"

    def shard(self, index: int, hook: str) -> Tensor:
        """Shard ``index`` at ``hook`` as a [rows, d] tensor backed by a memory map (no copy)."""
        key = (index, hook)
        if key not in self._maps:
            self._maps[key] = _memmap(self.path / self.shards[index]["file"], hook)
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
    bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(-1).nonzero()[0, 0].item()
    value = x.reshape(x.shape[0], -1)[bad][~torch.isfinite(x.reshape(x.shape[0], -1)[bad])][0].item()
    raise ActivationDataError(f"non-finite activation ({value}) in {where}, row {row_offset + bad}")


def _canon(hook: str) -> str:
    from interplab.hooks import Site

    return Site.parse(hook).name


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not an activation cache: no {MANIFEST}")
    manifest = json.loads(file.read_text())
    if manifest.get("version") != STORE_VERSION:
        raise ValueError(
            f"{file}: unsupported cache version {manifest.get('version')!r}; this interplab reads {STORE_VERSION}"
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
