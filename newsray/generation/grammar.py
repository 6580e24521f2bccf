"""Structured decoding (eval.constrained) with llguidance: the task's grammar as a logits processor.

The grammar is the task's (`Task.grammar`, newsray/tasks/): news, the NewsAnswer JSON schema with
bounded strings and lists (newsray.tasks.news.answer_json_schema); AG News, exactly one of the four
label names, then end-of-turn. llguidance (the Rust grammar engine behind guidance, also used by
vLLM, SGLang and llama.cpp) computes, per row and step, the bitmask of tokens that keep the output
inside the grammar; this module applies it to the logits of the engine's greedy step
(newsray.generation.engine), row by row: every row carries its own `RowGrammar`, so rows that join
and leave the running batch keep their grammar state.

Termination within max_new_tokens is guaranteed by a budget reserve: once the tokens left for a row
fall to `reserve` (the length of the shortest complete answer + 8), the row is steered to close
what is open, among the tokens the grammar allows: a closing quote inside a string, else `]`/`}`,
else any non-whitespace token. Each such token emits at least one byte of the shortest completion,
so the object is complete before the budget ends (for max_new_tokens >= reserve).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from newsray.errors import GenerationError
from newsray.generation.stop import JsonScanner
from newsray.tasks import task_type


class TaskConstraint:
    """A task's compiled grammar for one tokenizer: a RowGrammar per generation, masks for a batch of them."""

    def __init__(self, tokenizer: Any, task: str, stop_ids: list[int], token_texts: list[str]):
        import llguidance
        import llguidance.hf
        from llguidance import LLMatcher

        self.grammar, self.reserve = task_type(task).grammar()
        try:  # llguidance reads the tokenizer's byte decoding; a tokenizer it cannot map fails here
            self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(stop_ids))
            problem = LLMatcher.validate_grammar(self.grammar, self.ll_tokenizer)
        except (ValueError, TypeError, RuntimeError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise GenerationError(f"the {task} answer grammar cannot be expressed with this model's tokenizer ({str(problem)[:300]}); "
                                  "run without constrained decoding (eval.constrained=false / serve.constrained=false).")
        self.executor = llguidance.LLExecutor(num_threads=1)
        self.stop_ids = set(stop_ids)
        self.texts = token_texts
        n = self.ll_tokenizer.vocab_size
        texts = token_texts[:n] + [""] * max(0, n - len(token_texts))
        self.quote = np.array([t == '"' for t in texts])
        self.closer = np.array([bool(t) and set(t) <= {"]", "}"} for t in texts])
        self.nonspace = np.array([bool(t.strip()) for t in texts])

    def row(self, max_new_tokens: int) -> RowGrammar:
        """A fresh grammar state for one generation of at most `max_new_tokens` tokens."""
        return RowGrammar(self, max_new_tokens)

    def apply(self, rows: list[RowGrammar], scores: Any) -> Any:
        """`scores` (one line per row, for each row's next token) with the tokens its grammar forbids at -inf."""
        import torch

        n = self.ll_tokenizer.vocab_size
        words = (n + 31) // 32
        bitmask = np.full((len(rows), words), -1, dtype=np.int32)
        self.executor.unsafe_compute_mask_ptr([(g.matcher, i) for i, g in enumerate(rows)], bitmask.ctypes.data, words * 4, len(rows))
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :n].astype(bool)
        for i, g in enumerate(rows):
            if g.max_new - g.step <= self.reserve:
                g.steer_to_close(allowed[i])
        full = np.zeros(scores.shape, dtype=bool)
        width = min(n, scores.shape[1])
        full[:, :width] = allowed[:, :width]
        return scores.masked_fill(~torch.from_numpy(full).to(scores.device), float("-inf"))


class RowGrammar:
    """One row's grammar state: its matcher, a JSON scanner (to know whether it is inside a string) and its step."""

    __slots__ = ("c", "matcher", "max_new", "scanner", "step")

    def __init__(self, c: TaskConstraint, max_new_tokens: int):
        from llguidance import LLMatcher

        self.c, self.max_new, self.step = c, max_new_tokens, 0
        self.matcher = LLMatcher(c.ll_tokenizer, c.grammar, log_level=0)
        self.scanner = JsonScanner()

    def consume(self, tok: int) -> None:
        """Feed the token the row generated (GenerationError if its grammar does not allow it)."""
        if not self.matcher.consume_token(tok):
            raise GenerationError(f"constrained decoding left its grammar at token {self.step} ({self.matcher.get_error()[:300]})")
        self.scanner.feed(self.c.texts[tok] if tok < len(self.c.texts) else "")
        self.step += 1

    def steer_to_close(self, allowed: np.ndarray) -> None:
        """Narrow the allowed tokens to those that close the answer fastest (budget reserve)."""
        s = self.scanner
        prefs = [self.c.quote] if s.in_string and not s.escape else [self.c.closer]
        prefs.append(self.c.nonspace)
        for pref in prefs:
            narrowed = allowed & pref
            if narrowed.any():
                allowed[:] = narrowed
                return
