"""newsray: Ray-native LoRA fine-tuning, search, evaluation and serving for news analysis."""

import os as _os

# No network here and no reason to phone home: keep MLflow's telemetry off everywhere
# (set before mlflow is imported by any stage).
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_os.environ.setdefault("DO_NOT_TRACK", "true")
# Ray's auth mode is chosen explicitly, before Ray is imported anywhere (ray.auth_mode in the
# config; the environment wins). A `ray start` head and the Jobs SDK must use the same mode.
_os.environ.setdefault("RAY_AUTH_MODE", "token")

__version__ = "0.1.0"
