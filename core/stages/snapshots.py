"""The training history of a run: its fp16 weight snapshots at log-spaced steps, and their views.

    python -m core snapshots --run shakespeare     # {"steps": [0, 10, 30, 100, 300, 500], "bytes": ..., "budget_bytes": ...}

Pre-training keeps the weights of steps 0, 10, 30, 100, 300, … and the last, within a disk budget
per run (`pretrain --snapshot-mb`). Page 4's time slider (and pages 5 and 6) redraw, for a chosen
snapshot, a sample of a fixed prompt, the per-token loss, the attention maps and the embedding map.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.gpt import embeddings, health
from core.gpt.attention import scaled_dot_product_attention
from core.gpt.errors import GlassBoxError
from core.gpt.microscope import per_token_loss
from core.lab import runs, snapshots
from core.lab.cli import option

COMMAND = "snapshots"


@dataclass
class Settings:
    run: str | None = option(None, metavar="ID", help="the run whose snapshots to list")

    def __post_init__(self):
        if not self.run:
            raise GlassBoxError("Name the run: python -m core snapshots --run ID.")


def run(settings: Settings, progress=None) -> dict:
    """The snapshot steps on disk, their total bytes and the run's budget (read only)."""
    history = snapshots.run_history(settings.run)
    _, skipped = snapshots.loadable_steps(settings.run)
    out = {"run_id": settings.run, "steps": history["steps"], "bytes": history["bytes"],
           "budget_bytes": history["budget_bytes"]}
    if history["note"]:
        out["note"] = history["note"]
    if skipped:
        out["skipped"] = skipped
    return out


def results(run_id: str) -> dict:
    """The slider's steps (loadable ones), the files skipped (named), and a note for old runs."""
    history = snapshots.run_history(run_id)
    good, skipped = snapshots.loadable_steps(run_id)
    return {**history, "steps": good, "skipped": skipped}


def views(run_id: str, step: int | None, query: str | None = None) -> dict:
    """The views of one snapshot (see core.lab.snapshots.views); a damaged file raises, named."""
    return snapshots.views(run_id, step, query)


def run_ids() -> list[str]:
    """Runs that hold a language model with a history to travel through (or at least weights)."""
    return [r.id for r in runs.list_runs(("pretrain",)) if not r.error and "model" in r.config]


CODE = {"embedding map": (embeddings.pca, embeddings.nearest_neighbours),
        "positions": (embeddings.position_similarity,),
        "per-token loss": (per_token_loss,), "attention": (scaled_dot_product_attention,),
        "health": (health.health_messages, health.overfitting), "device": (health.device_check,)}
