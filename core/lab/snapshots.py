"""Training history: fp16 copies of a run's weights at log-spaced steps, within a disk budget.

    checkpoints/<run-id>/snapshots/step-000100.safetensors   (metadata: step)

Steps 0, 10, 30, 100, 300, 1000, … (what the model knew early changes fastest) plus the last step
the run reached. fp16 halves the bytes and is plenty for viewing. The budget is per run: when the
next snapshot would not fit, the snapshot whose neighbours are closest (in log-steps) is dropped;
step 0 and the newest are always kept, so a budget must hold at least two.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.gpt.errors import TrainingError
from core.lab import runs
from core.lab.models import model_tensors

FOLDER = "snapshots"
DEFAULT_BUDGET_MB = 64.0
_NAME = re.compile(r"step-(\d{6,})\.safetensors")


def log_spaced(step: int) -> bool:
    """True for 0, 10, 30, 100, 300, 1000, 3000, …"""
    if step == 0:
        return True
    if step < 10:
        return False
    digits = str(step)
    return digits[0] in "13" and set(digits[1:]) == {"0"}


def snapshot_bytes(model: torch.nn.Module) -> int:
    """Bytes of one fp16 snapshot of `model` (tied tensors stored once)."""
    return sum(2 * t.numel() for t in model_tensors(model).values() if t.is_floating_point())


def file_name(step: int) -> str:
    return f"step-{step:06d}.safetensors"


@dataclass
class Snapshot:
    step: int
    path: Path
    bytes: int


def list_snapshots(run_path: Path) -> list[Snapshot]:
    """The snapshot files of a run, by step (a file with a bad name is not a snapshot)."""
    folder = Path(run_path) / FOLDER
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_file():
            found.append(Snapshot(int(m.group(1)), p, p.stat().st_size))
    return sorted(found, key=lambda s: s.step)


def check_budget(budget_bytes: int, one_snapshot: int) -> None:
    if budget_bytes and budget_bytes < 2 * one_snapshot:
        raise TrainingError(
            f"One snapshot of this model takes {one_snapshot / 2**20:.1f} MB, so a snapshot budget of "
            f"{budget_bytes / 2**20:.1f} MB cannot hold even two (the first step and the last). Give at "
            f"least {math.ceil(2 * one_snapshot / 2**20)} MB, or 0 for no snapshots."
        )


class Plan:
    """Which steps to keep, and the budget they must fit in (0 bytes: no snapshots)."""

    def __init__(self, budget_bytes: int, model: torch.nn.Module):
        self.budget_bytes = int(budget_bytes)
        self.one = snapshot_bytes(model)
        check_budget(self.budget_bytes, self.one)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def maybe_save(self, run_path: Path, model, step: int) -> None:
        if self.enabled and log_spaced(step):
            self.save(run_path, model, step)

    def save(self, run_path: Path, model, step: int, last: bool = False) -> None:
        """Write the snapshot of `step` (once), then keep the folder within budget."""
        if not self.enabled:
            return
        folder = Path(run_path) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / file_name(step)
        if not target.exists():
            tensors = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
                       for k, v in model_tensors(model).items()}
            runs.save_tensors(target, tensors, {"step": str(step), "format": "pt"})
        self.prune(run_path, newest=step)

    def prune(self, run_path: Path, newest: int) -> None:
        kept = list_snapshots(run_path)
        # an older "last" that is not log-spaced is superseded by the newer one
        for s in kept:
            if s.step != newest and not log_spaced(s.step) and s.step < newest:
                s.path.unlink(missing_ok=True)
        kept = list_snapshots(run_path)
        while len(kept) > 2 and sum(s.bytes for s in kept) > self.budget_bytes:
            drop = _most_crowded(kept, newest)
            drop.path.unlink(missing_ok=True)
            kept.remove(drop)


def _most_crowded(kept: list[Snapshot], newest: int) -> Snapshot:
    """The inner snapshot whose neighbours are closest in log-steps (the one the history misses least)."""
    logs = [math.log10(s.step + 1) for s in kept]
    inner = [i for i in range(1, len(kept) - 1) if kept[i].step != newest] or [1]
    return kept[min(inner, key=lambda i: logs[i + 1] - logs[i - 1])]


def summary(run_id: str) -> dict:
    """What `python -m core snapshots --run ID` prints: steps on disk, their bytes, the budget."""
    run = runs.open_run(run_id)
    found = list_snapshots(run.path)
    budget = (run.config.get("snapshots") or {}).get("budget_bytes")
    return {"run_id": run_id, "steps": [s.step for s in found], "bytes": sum(s.bytes for s in found),
            "budget_bytes": budget}


def load_snapshot(snapshot: Snapshot) -> dict[str, torch.Tensor]:
    """The snapshot's tensors in fp32 (a damaged file raises CorruptRunError, naming it)."""
    tensors = runs.load_tensors(snapshot.path)
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
