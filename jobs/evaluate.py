"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/evaluate.py --config C --model M [overrides]`.

Thin: the same newsray.evaluate.pipeline.evaluate() as `newsray evaluate`; prints one
`NEWSRAY_RESULT {json}` line (out_dir, run_id, aggregates).
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "newsray").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # the job's working dir is the repo: make the package importable

from newsray.evaluate.pipeline import evaluate  # noqa: E402
from newsray.submit import run_job  # noqa: E402


if __name__ == "__main__":
    run_job(evaluate, takes_model=True)
