"""Ray job: a hyperparameter search (newsray.tune.tune); `--resume` continues tune.name or the newest unfinished one.

    ray job submit --working-dir . -- python jobs/tune.py --config configs/news-smollm2-135m-cpu.yaml [--resume]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's newsray/, if shipped

from newsray.submit import run_job  # noqa: E402
from newsray.tune import tune  # noqa: E402

RESUME = "--resume" in sys.argv[1:]


def tune_stage(cfg):
    """Search lr / LoRA rank / batch size with Ray Tune over Ray Train; register the best adapter."""
    return tune(cfg, resume=RESUME)


if __name__ == "__main__":
    run_job(tune_stage, [a for a in sys.argv[1:] if a != "--resume"])
