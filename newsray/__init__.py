"""newsray: Ray-native LoRA fine-tuning, search, evaluation and serving for news analysis."""

import os as _os

# No network here and no reason to phone home: keep MLflow's telemetry off everywhere
# (set before mlflow is imported by any stage).
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_os.environ.setdefault("DO_NOT_TRACK", "true")

__version__ = "0.1.0"
