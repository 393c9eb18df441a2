"""The run log: ``log.jsonl`` (one JSON object per logged step or event), plus optional TensorBoard / wandb."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from interplab.io import atomic_write_text
from interplab.runs import LOG, read_log
from interplab.train.config import Logger, TrainConfig

__all__ = ["RunLog", "read_log", "truncate_log"]


def truncate_log(run_dir: Path, step: int) -> None:
    """Drop the log rows of steps after ``step`` (events without a step stay), and a torn last line that a
    killed run left."""
    file = run_dir / LOG
    if not file.is_file():
        return
    lines = file.read_text().splitlines()
    written = [line for line in lines if line.strip()]
    rows = read_log(run_dir)  # the rows of `written`, but a torn last one
    keep = [line for line, row in zip(written[: len(rows)], rows, strict=True) if row.get("step", -1) <= step]
    if len(keep) != len(lines):
        atomic_write_text(file, "".join(line + "\n" for line in keep))


class RunLog:
    """``log.jsonl`` (one JSON object per line, appended and flushed) plus optional TensorBoard / wandb."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, main: bool) -> None:
        self.fh = open(run_dir / LOG, "a") if main else None  # noqa: SIM115
        self.sinks: list[Any] = []
        if not main:
            return
        for logger in cfg.loggers:
            if logger is Logger.TENSORBOARD:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ImportError(
                        "loggers=[tensorboard] needs tensorboard: pip install tensorboard"
                    ) from None
                self.sinks.append(("tb", SummaryWriter(str(run_dir / "tensorboard"))))
            else:
                try:
                    import wandb
                except ImportError:
                    raise ImportError("loggers=[wandb] needs wandb: pip install wandb") from None
                self.sinks.append(
                    (
                        "wandb",
                        wandb.init(
                            project="interplab",
                            name=cfg.name or run_dir.name,
                            config=cfg.to_dict(),
                            dir=str(run_dir),
                        ),
                    )
                )

    def write(self, row: dict[str, Any]) -> None:
        if self.fh is None:
            return
        self.fh.write(json.dumps({**row, "time": time.time()}) + "\n")
        self.fh.flush()
        step = row.get("step")
        if step is None:
            return
        for kind, sink in self.sinks:
            numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            if kind == "tb":
                for k, v in numbers.items():
                    sink.add_scalar(k, v, step)
            else:
                sink.log(numbers, step=step)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        for kind, sink in self.sinks:
            sink.close() if kind == "tb" else sink.finish()
