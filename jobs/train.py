"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/train.py --config C [overrides]`.

Thin: the same newsray.train.train() as `newsray train`; prints one `NEWSRAY_RESULT {json}` line
(adapter_dir, adapter_uri, mlflow_run_id, metrics, checkpoint, run_name). Ray is joined through
$RAY_ADDRESS, which `ray job submit` sets for the job's driver.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "newsray").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # the job's working dir is the repo: make the package importable

from newsray.submit import run_job  # noqa: E402
from newsray.train import train  # noqa: E402

if __name__ == "__main__":
    run_job(train)
