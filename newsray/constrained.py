"""Structured decoding (eval.constrained) with llguidance: the task's grammar as a logits processor.

News: the NewsAnswer JSON schema with bounded strings and lists (newsray.tasks.news.answer_json_schema).
AG News: exactly one of the four label names, then end-of-turn. llguidance (the Rust grammar
engine behind guidance, also used by vLLM, SGLang and llama.cpp) computes, per row and step, the
bitmask of tokens that keep the output inside the grammar; this module applies it to the logits
of newsray.inference's batched greedy decode loop.

Termination within max_new_tokens is guaranteed by a budget reserve: once the tokens left for a row
fall to `reserve` (the length of the shortest complete answer + 8), the row is steered to close
what is open, among the tokens the grammar allows: a closing quote inside a string, else `]`/`}`,
else any non-whitespace token. Each such token emits at least one byte of the shortest completion,
so the object is complete before the budget ends (for max_new_tokens >= reserve).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from newsray.inference import JsonScanner


def news_grammar() -> tuple[str, int]:
    """(llguidance grammar, budget reserve in tokens) of the news answer schema."""
    from llguidance import LLMatcher

    from newsray.tasks.news import answer_json_schema

    shortest = json.dumps({"relevance_score": 10, "summary": "", "key_insights": [], "company_names": []}, separators=(",", ":"))
    return LLMatcher.grammar_from_json_schema(answer_json_schema()), len(shortest) + 8


def agnews_grammar() -> tuple[str, int]:
    """(llguidance grammar, reserve) accepting exactly one AG News label name."""
    import re

    from llguidance import LLMatcher

    from newsray.tasks.agnews import LABELS

    return LLMatcher.grammar_from_regex("(" + "|".join(re.escape(label) for label in LABELS) + ")"), 0


class TaskConstraint:
    """A task's compiled grammar for one tokenizer; makes a logits processor per generate() call."""

    def __init__(self, tokenizer: Any, task: str, stop_ids: list[int], token_texts: list[str]):
        import llguidance
        import llguidance.hf
        from llguidance import LLMatcher

        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(stop_ids))
        self.grammar, self.reserve = news_grammar() if task == "news" else agnews_grammar()
        problem = LLMatcher.validate_grammar(self.grammar, self.ll_tokenizer)
        if problem:
            raise RuntimeError(f"the {task} grammar is invalid for this tokenizer: {problem}")
        self.executor = llguidance.LLExecutor(num_threads=1)
        self.stop_ids = set(stop_ids)
        self.texts = token_texts
        n = self.ll_tokenizer.vocab_size
        texts = token_texts[:n] + [""] * max(0, n - len(token_texts))
        self.quote = np.array([t == '"' for t in texts])
        self.closer = np.array([bool(t) and set(t) <= {"]", "}"} for t in texts])
        self.nonspace = np.array([bool(t.strip()) for t in texts])

    def mask(self, batch_size: int, max_new_tokens: int) -> GrammarMask:
        """A fresh grammar state (one matcher per row) for one batch of generations."""
        return GrammarMask(self, batch_size, max_new_tokens)


class GrammarMask:
    """Per-row grammar state of one batch: masks logits to the allowed tokens, consumes the chosen ones.

    Rows are the batch's original row indices, so the decode loop can drop finished rows and
    pass only the active ones.
    """

    def __init__(self, c: TaskConstraint, batch_size: int, max_new_tokens: int):
        from llguidance import LLMatcher

        self.c, self.max_new = c, max_new_tokens
        self.matchers = [LLMatcher(c.ll_tokenizer, c.grammar, log_level=0) for _ in range(batch_size)]
        self.scanners = [JsonScanner() for _ in range(batch_size)]
        n = c.ll_tokenizer.vocab_size
        self.words = (n + 31) // 32
        self.n_vocab = n

    def consume(self, r: int, tok: int) -> None:
        """Feed row r the token it generated (RuntimeError if the grammar does not allow it)."""
        m = self.matchers[r]
        if not m.consume_token(tok):
            raise RuntimeError(f"constrained decoding: row {r} left its grammar ({m.get_error()[:300]})")
        self.scanners[r].feed(self.c.texts[tok] if tok < len(self.c.texts) else "")

    def _steer_to_close(self, r: int, allowed: np.ndarray) -> None:
        """Narrow row r's allowed tokens to those that close the answer fastest (budget reserve)."""
        s = self.scanners[r]
        prefs = [self.c.quote] if s.in_string and not s.escape else [self.c.closer]
        prefs.append(self.c.nonspace)
        for pref in prefs:
            narrowed = allowed & pref
            if narrowed.any():
                allowed[:] = narrowed
                return

    def apply(self, rows: list[int], step: int, scores: Any) -> Any:
        """`scores` (one line per entry of `rows`, for new token number `step`) with disallowed tokens at -inf."""
        import torch

        bitmask = np.full((len(rows), self.words), -1, dtype=np.int32)
        self.c.executor.unsafe_compute_mask_ptr([(self.matchers[r], i) for i, r in enumerate(rows)],
                                                bitmask.ctypes.data, self.words * 4, len(rows))
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : self.n_vocab].astype(bool)
        if self.max_new - step <= self.c.reserve:
            for i, r in enumerate(rows):
                self._steer_to_close(r, allowed[i])
        full = np.zeros(scores.shape, dtype=bool)
        width = min(self.n_vocab, scores.shape[1])
        full[:, :width] = allowed[:, :width]
        return scores.masked_fill(~torch.from_numpy(full).to(scores.device), float("-inf"))
