"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/evaluate.py --config C --model M [overrides]`.

Thin: the same newsray.evaluate.pipeline.evaluate() as `newsray evaluate`; prints one
`NEWSRAY_RESULT {json}` line (out_dir, run_id, aggregates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "newsray").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # the job's working dir is the repo: make the package importable

from newsray.evaluate.pipeline import evaluate
from newsray.submit import run_job

if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", "-m", default="baseline", help="baseline, an adapter directory or an MLflow URI.")
    known, rest = pre.parse_known_args()

    def evaluate_job(cfg):
        """Evaluate a model on the task's test set (Ray Data), logged to MLflow."""
        return evaluate(cfg, known.model)

    run_job(evaluate_job, rest)
