"""Data for expand-route-ablate: fixed-length windows, each labelled forget or retain.

``stdlib_windows`` cuts the running interpreter's standard library source into byte-level windows (vocabulary
256: one token per byte) and labels a window *forget* when its file matches a rule, e.g. every file of the
``email`` package. (Byte-level on purpose: it needs no tokenizer and is exact; `interplab.data`'s BPE corpora
can replace it by handing their own windows to `ERAData`.) ``markov_windows`` is a synthetic two-language
corpus for fast tests.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Int
from torch import Tensor

# stdlib folders that are not library code (tests, demos, vendored packages, the IDE)
_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip",
         "__pycache__", "tkinter", "pydoc_data", "unittest"}  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class ERAData:
    """Training and validation windows (``seq_len + 1`` tokens: inputs and next-token targets)."""

    train: Int[Tensor, "n window"]
    """training windows"""
    train_forget: Bool[Tensor, " n"]
    """which training windows belong to the forget set (ground truth; labelling may reveal only part)"""
    val_retain: Int[Tensor, "n_r window"]
    """held-out retain windows"""
    val_forget: Int[Tensor, "n_f window"]
    """held-out forget windows"""
    d_vocab: int
    """vocabulary size"""
    description: str = ""
    """where the windows came from"""

    def __post_init__(self) -> None:
        if self.train.ndim != 2 or self.train.shape[1] < 2:
            raise ValueError(f"train windows must be [n window>=2], got {tuple(self.train.shape)}")
        if self.train_forget.shape != (self.train.shape[0],):
            raise ValueError(
                f"train_forget has shape {tuple(self.train_forget.shape)}, expected ({self.train.shape[0]},)"
            )
        for name in ("val_retain", "val_forget"):
            value = getattr(self, name)
            if value.ndim != 2 or value.shape[1] != self.train.shape[1] or value.shape[0] == 0:
                raise ValueError(
                    f"{name} must be [n {self.train.shape[1]}] with n > 0, got {tuple(value.shape)}"
                )
        n_forget = int(self.train_forget.sum())
        if n_forget == 0 or n_forget == len(self.train_forget):
            raise ValueError(
                f"the training set needs forget and retain windows, got {n_forget} of {len(self.train)}"
            )

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1


def package_rule(package: str) -> Callable[[str], bool]:
    """Forget every file of a stdlib package: ``package_rule("email")`` matches ``email/...``."""
    prefix = package.strip("/") + "/"
    return lambda relative: relative.startswith(prefix) or relative == package + ".py"


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's library .py files, in sorted order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist")
    out = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if _SKIP & set(relative.split("/")[:-1]):
            continue
        out.append((relative, path))
    return out


def _windows(data: bytes, width: int) -> Tensor:
    n = len(data) // width
    if n == 0:
        return torch.empty(0, width, dtype=torch.long)
    return torch.frombuffer(bytearray(data[: n * width]), dtype=torch.uint8).view(n, width).long()


def stdlib_windows(
    *,
    forget: Callable[[str], bool] = package_rule("email"),
    seq_len: int = 128,
    retain_bytes: int = 3_000_000,
    val_every: int = 10,
    root: Path | None = None,
) -> ERAData:
    """Byte windows of the stdlib. Forget files are those matching ``forget``; retain files are spread evenly
    over the sorted library until ``retain_bytes``. Every ``val_every``-th file of each set is held out."""
    files = stdlib_files(root)
    forget_files = [f for f in files if forget(f[0])]
    retain_files = [f for f in files if not forget(f[0])]
    if not forget_files:
        raise ValueError("the forget rule matched no stdlib file")
    total = sum(p.stat().st_size for _, p in retain_files)
    stride = max(1, round(total / max(retain_bytes, 1)))
    retain_files = retain_files[::stride]
    width = seq_len + 1
    parts: dict[str, list[Tensor]] = {"train_f": [], "train_r": [], "val_f": [], "val_r": []}
    for kind, chosen in (("f", forget_files), ("r", retain_files)):
        for i, (_, path) in enumerate(chosen):
            split = "val" if i % val_every == val_every // 2 else "train"
            parts[f"{split}_{kind}"].append(_windows(path.read_bytes(), width))
    cat = {k: torch.cat(v) if v else torch.empty(0, width, dtype=torch.long) for k, v in parts.items()}
    train = torch.cat([cat["train_r"], cat["train_f"]])
    flags = torch.cat(
        [
            torch.zeros(len(cat["train_r"]), dtype=torch.bool),
            torch.ones(len(cat["train_f"]), dtype=torch.bool),
        ]
    )
    return ERAData(
        train=train, train_forget=flags, val_retain=cat["val_r"], val_forget=cat["val_f"], d_vocab=256,
        description=f"python stdlib bytes: {len(forget_files)} forget files, {len(retain_files)} retain files",
    )  # fmt: skip


def markov_windows(
    *, n_train: int = 2000, n_val: int = 200, seq_len: int = 32, d_vocab: int = 24, forget_fraction: float = 0.25,
    seed: int = 0,
) -> ERAData:  # fmt: skip
    """Two synthetic languages over one vocabulary: retain windows follow one sparse bigram chain, forget
    windows another. Learnable in seconds; what one language teaches does not predict the other."""
    gen = torch.Generator().manual_seed(seed)

    def chain() -> Tensor:  # each token has 2 likely successors
        probs = torch.full((d_vocab, d_vocab), 0.02 / d_vocab)
        for t in range(d_vocab):
            probs[t, torch.randperm(d_vocab, generator=gen)[:2]] += 0.49
        return probs / probs.sum(1, keepdim=True)

    chains = [chain(), chain()]

    def sample(n: int, which: int) -> Tensor:
        out = torch.empty(n, seq_len + 1, dtype=torch.long)
        out[:, 0] = torch.randint(0, d_vocab, (n,), generator=gen)
        for p in range(1, seq_len + 1):
            out[:, p] = torch.multinomial(chains[which][out[:, p - 1]], 1, generator=gen)[:, 0]
        return out

    n_forget = max(1, round(n_train * forget_fraction))
    train = torch.cat([sample(n_train - n_forget, 0), sample(n_forget, 1)])
    flags = torch.zeros(n_train, dtype=torch.bool)
    flags[n_train - n_forget :] = True
    return ERAData(
        train=train, train_forget=flags, val_retain=sample(n_val, 0), val_forget=sample(n_val, 1), d_vocab=d_vocab,
        description=f"two bigram languages over {d_vocab} tokens",
    )  # fmt: skip
