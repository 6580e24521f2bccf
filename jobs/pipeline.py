"""Ray job: the end-to-end pipeline (newsray.pipeline.pipeline).

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/news-smollm2-135m-cpu.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's newsray/, if shipped

from newsray.pipeline import pipeline  # noqa: E402
from newsray.submit import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(pipeline)
