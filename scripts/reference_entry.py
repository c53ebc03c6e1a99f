"""Print a finished run as an entry for core/lab/references.py (the curve part; the match, recipe,
machine and command are written by hand beside it).

    python scripts/reference_entry.py RUN_ID [EVERY]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.lab import runs  # noqa: E402
from core.lab.references import RECIPE_KEYS, reference_from_metrics  # noqa: E402


def main(run_id: str, every: int = 1) -> None:
    run = runs.open_run(run_id)
    curve = reference_from_metrics(run.metrics(), every)
    train = run.config.get("train") or {}
    last = run.metrics()[-1]
    print(json.dumps({"recipe": {k: train.get(k) for k in RECIPE_KEYS}, "seconds": last.get("elapsed_s"), **curve}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
