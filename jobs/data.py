"""Ray job: validate the task data and record its statistics as an MLflow run.

    ray job submit --working-dir . -- python jobs/data.py --config configs/news-smollm2-135m-cpu.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's newsray/, if shipped

from newsray.submit import run_job  # noqa: E402
from newsray.tasks import data_report  # noqa: E402


def data(cfg):
    """Validate and describe the task data (tracked in MLflow)."""
    return data_report(cfg, track=True)


if __name__ == "__main__":
    run_job(data)
