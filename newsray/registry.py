"""The MLflow Model Registry: adapters registered as `newsray-<task>` versions, and the `champion` alias.

Every registration adds a new version (nothing is ever deleted or overwritten). The alias
`champion` moves to the new version only if it beats the current champion on the same objective,
measured on the same basis (task, split, validation fraction and training data); the objective,
its value, its direction and that basis are stored as version tags and in the description.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from newsray.config import Config
from newsray.errors import ModelError

log = logging.getLogger(__name__)

CHAMPION = "champion"
MODES = {"val_loss": "min", "f1": "max", "accuracy": "max"}
TAG_OBJECTIVE, TAG_VALUE, TAG_MODE, TAG_BASIS, TAG_SOURCE = (
    "newsray.objective", "newsray.objective_value", "newsray.objective_mode", "newsray.objective_basis", "newsray.source")


@dataclass(frozen=True)
class Registration:
    """A registered version and what happened to the champion alias."""

    name: str
    version: str
    uri: str  # models:/<name>/<version>
    champion_moved: bool
    champion_version: str  # the version the alias points at afterwards
    reason: str  # one sentence: why the alias moved or stayed


def objective_basis(cfg: Config, data_hashes: dict[str, str]) -> str:
    """What an objective value was measured on (task, validation split, data files); only equal bases compare."""
    import hashlib
    import json

    from newsray.tasks import get_task

    rows = get_task(cfg).train_selection()
    digest = hashlib.sha256(json.dumps({"files": data_hashes, "train_rows": rows}, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.data.task}:val_fraction={cfg.data.val_fraction:g}:data={digest}"


def better(value: float, than: float, mode: str) -> bool:
    """Strictly better in the objective's direction."""
    return value < than if mode == "min" else value > than


def _client(cfg: Config) -> Any:
    import mlflow

    from newsray import tracking

    uri = tracking.tracking_uri(cfg)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion(cfg: Config) -> Any | None:
    """The model version the champion alias points at (None if there is none)."""
    from mlflow.exceptions import MlflowException

    from newsray.tracking import registered_model_name

    try:
        return _client(cfg).get_model_version_by_alias(registered_model_name(cfg), CHAMPION)
    except MlflowException:
        return None


def pin_alias(cfg: Config, model_ref: str) -> str:
    """`models:/<name>@<alias>` -> `models:/<name>/<version>` it points at now (ModelError if none); any other ref unchanged.

    Serve pins at deploy time, so every replica (started now or later) loads the same version, and a new
    champion reaches the endpoint only by redeploying."""
    from mlflow.exceptions import MlflowException

    from newsray.tracking import tracking_uri

    ref = model_ref.strip()
    if not ref.startswith("models:/") or "@" not in ref:
        return ref
    name, _, alias = ref[len("models:/"):].partition("@")
    try:
        version = _client(cfg).get_model_version_by_alias(name, alias.strip("/")).version
    except MlflowException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"{ref}: the registry at {tracking_uri(cfg)} has no version under that alias ({first}); "
                         "check the model name and alias (newsray register / the MLflow UI).") from None
    return f"models:/{name}/{version}"


def _decide(current: Any | None, objective: str, value: float, mode: str, basis: str) -> tuple[bool, str]:
    """(move the alias?, why) for a new version against the current champion version."""
    if current is None:
        return True, "there was no champion yet"
    tags = current.tags or {}
    old_obj, old_basis = tags.get(TAG_OBJECTIVE), tags.get(TAG_BASIS)
    try:
        old_value = float(tags.get(TAG_VALUE, "nan"))
    except ValueError:
        old_value = float("nan")
    if old_obj != objective or old_basis != basis or not math.isfinite(old_value):
        return False, (f"champion version {current.version} was scored on {old_obj or 'nothing recorded'} ({old_basis or 'no basis'}), "
                       f"this one on {objective} ({basis}): not comparable, so the alias stays; move it by hand if you mean to")
    if better(value, old_value, mode):
        return True, f"{objective} {value:.4f} beats champion version {current.version} ({old_value:.4f}, {'lower' if mode == 'min' else 'higher'} is better)"
    return False, f"{objective} {value:.4f} does not beat champion version {current.version} ({old_value:.4f}, {'lower' if mode == 'min' else 'higher'} is better)"


def register(cfg: Config, adapter_uri: str, run_id: str, objective: str, value: float, basis: str,
             source: str, extra_tags: dict[str, str] | None = None) -> Registration:
    """Register `adapter_uri` (runs:/<id>/adapter) as a new version; move `champion` only if it is better."""
    from mlflow.exceptions import MlflowException

    from newsray.tracking import registered_model_name

    if not math.isfinite(value):
        raise ModelError(f"cannot register {adapter_uri}: its {objective} is {value}, not a finite number.")
    name, mode = registered_model_name(cfg), MODES[objective]
    client = _client(cfg)
    try:
        client.create_registered_model(name, description=f"newsray LoRA adapters for the {cfg.data.task} task "
                                                          f"(base {cfg.model.name}); alias {CHAMPION} = the best so far.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    current = champion(cfg)
    move, reason = _decide(current, objective, value, mode, basis)
    description = (f"{objective} = {value:.6g} ({'lower' if mode == 'min' else 'higher'} is better) on the temporal validation "
                   f"split [{basis}]; from {source}.")
    tags = {TAG_OBJECTIVE: objective, TAG_VALUE: repr(float(value)), TAG_MODE: mode, TAG_BASIS: basis, TAG_SOURCE: source,
            **(extra_tags or {})}
    # A plain artifact directory has no MLmodel, so mlflow.register_model refuses it: the client
    # API registers the run's adapter/ path as the version's source (models:/ URIs download it).
    mv = client.create_model_version(name, adapter_uri, run_id=run_id, tags=tags, description=description)
    if move:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    champ = str(mv.version) if move else str(current.version)
    log.info("registered %s version %s; champion -> %s (%s)", name, mv.version, champ, reason)
    return Registration(name, str(mv.version), f"models:/{name}/{mv.version}", move, champ, reason)
