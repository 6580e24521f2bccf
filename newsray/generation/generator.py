"""A loaded model for one task: chat prompts in, greedy answers out, through the engine.

`load_generator(model_ref, cfg)` resolves `baseline`, a local PEFT adapter directory or an MLflow
URI (newsray.generation.refs), loads base + adapter (merged) once and returns a `Generator`.
`Generator.generate` (a batch, blocking) and `Generator.agenerate` (one request, awaitable) format
prompts with `newsray.formatting.Formatter` (byte-identical to training), stop a row on the
end-of-turn/EOS ids or (news task) as soon as its first top-level JSON object closes, and decode
only the new tokens. `constrained=True` adds the task's grammar (newsray.generation.grammar).
Both run on the generator's `Engine` (continuous batching, newsray.generation.engine).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from newsray.config import Config
from newsray.errors import ModelError
from newsray.generation.engine import Engine, FinishReason, Request
from newsray.generation.refs import ModelSpec, resolve_model_ref
from newsray.tasks import task_type

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    """One row's continuation: decoded new text, tokens generated, and why it ended."""

    text: str
    n_new_tokens: int
    finish_reason: FinishReason  # stop: end-of-turn/EOS; json_end: first JSON object closed; length: budget; error: see error
    error: str | None = None  # finish_reason "error": why the row's constrained decoding stopped (text = its tokens so far)


class Generator:
    """A loaded model + tokenizer that generates answers for one task on a continuous-batching engine."""

    def __init__(self, model: Any, tokenizer: Any, task: str, spec: ModelSpec, device: str = "cpu", slots: int = 8,
                 shared: tuple[str, Any] | None = None):
        from newsray.formatting import Formatter

        self.model, self.tokenizer, self.task, self.spec, self.device = model, tokenizer, task, spec, device
        self.shared = shared  # (adapter name, SharedBase): the model is a pool's, switched to this adapter per step
        self.formatter = Formatter.for_tokenizer(tokenizer, spec.model.max_seq_length)
        self.stop_ids = self.formatter.stop_token_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.formatter.eot_id
        self.slots = slots
        self._texts: list[str] | None = None
        self._constraint: Any = None
        self._engine: Engine | None = None

    @property
    def base_model(self) -> str:
        return self.spec.model.name

    @property
    def token_texts(self) -> list[str]:
        """The decoded text of every token id (built once; used by the JSON stop and constraints)."""
        if self._texts is None:
            n = max(len(self.tokenizer), self.model.get_output_embeddings().weight.shape[0])
            self._texts = self.tokenizer.batch_decode([[i] for i in range(min(n, len(self.tokenizer)))],
                                                      skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._texts += [""] * (n - len(self._texts))
        return self._texts

    def constraint(self) -> Any:
        """The task's grammar constraint (newsray.generation.grammar), built once."""
        if self._constraint is None:
            from newsray.generation.grammar import TaskConstraint

            self._constraint = TaskConstraint(self.tokenizer, self.task, self.stop_ids, self.token_texts)
        return self._constraint

    @property
    def engine(self) -> Engine:
        """The continuous-batching engine of this model (built on first use)."""
        if self._engine is None:
            shared = self.shared
            self._engine = Engine(self.model, slots=self.slots, stop_ids=self.stop_ids, token_texts=self.token_texts,
                                  pad_id=self.pad_id, device=self.device, max_length=self.formatter.max_seq_length,
                                  context=(lambda: shared[1].activate(shared[0])) if shared else nullcontext)
        return self._engine

    def request(self, messages: list[dict[str, str]], max_new_tokens: int, constrained: bool = False) -> Request:
        """An engine request for one chat prompt."""
        prompt = self.formatter.prompt_ids(messages)
        if len(prompt) + max_new_tokens > self.formatter.max_seq_length:
            log.warning("prompt (%d tokens) + max_new_tokens (%d) exceed model.max_seq_length (%d)",
                        len(prompt), max_new_tokens, self.formatter.max_seq_length)
        grammar = self.constraint().row(max_new_tokens) if constrained else None
        return Request(prompt, max_new_tokens, grammar=grammar, json_stop=task_type(self.task).json_stop)

    def result(self, req: Request) -> GenerationResult:
        toks = req.tokens if req.reason != "stop" else req.tokens[:-1]
        text = self.tokenizer.decode(toks, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return GenerationResult(text, len(req.tokens), req.reason, req.error)

    def generate(self, messages_batch: list[list[dict[str, str]]], max_new_tokens: int,
                 constrained: bool = False) -> list[GenerationResult]:
        """Greedy continuations of chat prompts, in order; all queued at once, decoded engine.slots at a time."""
        reqs = [self.request(m, max_new_tokens, constrained) for m in messages_batch]
        return [self.result(r) for r in self.engine.run(reqs)]

    async def agenerate(self, messages: list[dict[str, str]], max_new_tokens: int, constrained: bool = False) -> GenerationResult:
        """One continuation that joins the running batch at the engine's next step."""
        # Off the event loop: the first constrained request compiles the grammar (about a second).
        req = await asyncio.to_thread(self.request, messages, max_new_tokens, constrained)
        return self.result(await asyncio.wrap_future(self.engine.submit(req)))


def load_tokenizer_for(spec: ModelSpec) -> Any:
    """The adapter's own tokenizer (saved by training, with its chat template), else the base one."""
    from transformers import AutoTokenizer

    from newsray.models import load_tokenizer

    adapter = spec.adapter_dir
    if adapter is not None and (adapter / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(adapter), local_files_only=True)
        if spec.model.chat_template:
            tok.chat_template = Path(spec.model.chat_template).read_text(encoding="utf-8")
        if getattr(tok, "chat_template", None):
            tok.model_max_length = spec.model.max_seq_length
            return tok
    return load_tokenizer(spec.model)


def load_generator(model_ref: str, cfg: Config, device: str = "cpu", num_threads: float | None = None,
                   spec: ModelSpec | None = None, slots: int | None = None) -> Generator:
    """Resolve `model_ref`, load base (+ adapter, merged) once in eval mode; torch threads = CPUs given.

    slots: rows decoded together (default eval.batch_size).
    """
    import torch

    from newsray.models import load_model

    if num_threads:
        torch.set_num_threads(max(1, math.ceil(num_threads)))
    if spec is None or (spec.adapter_dir is not None and not spec.adapter_dir.is_dir()):
        spec = resolve_model_ref(model_ref, cfg)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer_for(spec)
    model = load_model(spec.model, device)
    if spec.adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(spec.adapter_dir), is_trainable=False).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"the adapter in {spec.adapter_dir} does not load onto {spec.model.name} "
                             f"({str(e).splitlines()[0][:200]}); check that it was trained on this base model.") from None
    model.eval()
    log.info("loaded %s (base %s, %s) in %.1fs", model_ref, spec.model.name, spec.model.dtype, time.perf_counter() - t0)
    return Generator(model, tokenizer, cfg.data.task, spec, device, slots=slots or cfg.eval.batch_size)
