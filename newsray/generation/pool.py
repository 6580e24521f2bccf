"""One adapter pool: an unmerged base model shared by several LoRA adapters (Serve's multiplexing)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from newsray.errors import ModelError
from newsray.generation.refs import ModelSpec

log = logging.getLogger(__name__)


class SharedBase:
    """One unmerged copy of a base model under several LoRA adapters (PEFT multi-adapter).

    Each adapter added costs its LoRA weights, not another copy of the base (a merged adapter is a
    full copy: 0.5 GB for SmolLM2-135M, 5 GB for Llama-3.2-1B in fp32). Generators made here take
    turns on the one model: `activate` switches the active adapter under a lock held for each
    engine step, so the adapters' engines interleave their steps.
    Unmerged LoRA costs a few extra small matmuls per layer and token.
    """

    def __init__(self, device: str = "cpu"):
        self.device, self.model, self.adapters = device, None, set()
        self.base_name: str | None = None
        self._lock = threading.Lock()

    def add(self, name: str, spec: ModelSpec, task: str, slots: int = 8) -> Any:
        """Load the adapter of `spec` as `name` (the base model once, on the first call) and return its Generator."""
        from peft import PeftModel

        from newsray.generation.generator import Generator, load_tokenizer_for
        from newsray.models import load_model

        if spec.adapter_dir is None:
            raise ModelError(f"model {name!r} is the base model, not an adapter: it needs no shared base.")
        with self._lock:
            if self.base_name is not None and spec.model.name != self.base_name:
                raise ModelError(f"adapter {name!r} is trained on {spec.model.name}, not on this pool's base {self.base_name}.")
            key = _peft_name(name)
            if key not in self.adapters:
                t0 = time.perf_counter()
                try:
                    if self.model is None:
                        base = load_model(spec.model, self.device)
                        self.model = PeftModel.from_pretrained(base, str(spec.adapter_dir), adapter_name=key, is_trainable=False)
                        self.base_name = spec.model.name
                    else:
                        self.model.load_adapter(str(spec.adapter_dir), adapter_name=key, is_trainable=False)
                except (OSError, ValueError, KeyError, RuntimeError) as e:
                    raise ModelError(f"the adapter in {spec.adapter_dir} does not load onto {spec.model.name} "
                                     f"({str(e).splitlines()[0][:200]}); check that it was trained on this base model.") from None
                self.model.eval()
                self.adapters.add(key)
                log.info("adapter %s (%s) added to the shared %s in %.1fs", name, spec.ref, spec.model.name, time.perf_counter() - t0)
        return Generator(self.model, load_tokenizer_for(spec), task, spec, self.device, slots=slots, shared=(key, self))

    def remove(self, name: str) -> None:
        """Drop an adapter's weights (the last one stays loaded, as a PeftModel needs one; adding its name again reuses it)."""
        key = _peft_name(name)
        with self._lock:
            if key in self.adapters and len(self.adapters) > 1:
                self.model.delete_adapter(key)
                self.adapters.discard(key)

    @contextmanager
    def activate(self, name: str) -> Iterator[None]:
        """Inside: `name` is the active adapter and no other generator uses the model."""
        with self._lock:
            self.model.set_adapter(name, inference_mode=True)
            yield


def _peft_name(model_id: str) -> str:
    """A PEFT adapter name for a served model id (torch module names cannot hold dots)."""
    return model_id.replace(".", "_")

