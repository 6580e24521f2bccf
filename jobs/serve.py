"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/serve.py --config C --model M [overrides]`.

Thin: the same newsray.serving.run() as `newsray serve`, detached: it deploys the app on the
cluster the job runs on and returns; the app outlives the job (`serve shutdown` or
`serve delete newsray` ends it). Prints one `NEWSRAY_RESULT {json}` line (url, model).
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "newsray").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # the job's working dir is the repo: make the package importable

from newsray.serving import run  # noqa: E402
from newsray.submit import run_job  # noqa: E402



def serve_job(cfg, model):
    """Deploy the news-analysis Serve app on this cluster and return its URL."""
    return {"url": run(cfg, model, blocking=False, detach=True), "model": model}


if __name__ == "__main__":
    run_job(serve_job, takes_model=True)
