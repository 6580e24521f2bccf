"""The decode engine: continuous batching over a preallocated slot KV cache, greedy, per-row rules.

A fixed number of slots decode together. Every step (1) admits waiting requests into free slots
and prefills them (right-padded, one forward), then (2) decodes one token for every active slot.
A row that finishes (end-of-turn/EOS, its first JSON object closed, its budget, or its grammar
failing: reason "error", the tokens so far kept) frees its slot, which the next waiting request
takes at the next step: the batch stays full while work is queued, as in vLLM. Each layer's keys and values live in one preallocated
tensor per layer, [slots, kv_heads, length, head_dim], written in place (`SlotCache`); a decode
step attends over a view of the first `hi` slots up to the longest active row, so nothing is
concatenated or copied per step. When the queue is empty and rows leave, the remaining rows are
moved down into the holes so the decoded prefix stays dense.

One engine serves both offline batches (`run`: evaluation, analyze) and online requests
(`submit`: Serve requests join the running batch at the next step instead of waiting for a batch
to form). One background thread runs the steps; callers wait on futures.

Numerics: the model, its attention kernel and greedy argmax are transformers'; only the cache and
the masks are ours. In fp32 the text equals one-row-at-a-time greedy decoding (tests).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

from newsray.errors import GenerationError
from newsray.generation.stop import JsonScanner

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "json_end", "length", "error"]  # error: the row's grammar failed (Request.error says how)


@dataclass(eq=False)
class Request:
    """One generation: prompt token ids, budget, optional grammar; the engine fills tokens and reason."""

    prompt: list[int]
    max_new_tokens: int
    grammar: Any = None  # a newsray.generation.grammar.RowGrammar, or None
    json_stop: bool = False
    tokens: list[int] = field(default_factory=list)
    reason: FinishReason = "length"
    error: str | None = None  # reason "error": one sentence; the other rows of the batch go on
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    scanner: JsonScanner | None = None
    admitted_step: int = -1  # engine.steps when the row took its slot, and when it left it
    finished_step: int = -1

    def __post_init__(self) -> None:
        if self.json_stop:
            self.scanner = JsonScanner()

    @property
    def cached(self) -> int:
        """Tokens of this row in the KV cache (the last chosen token is fed at the next step)."""
        return len(self.prompt) + max(0, len(self.tokens) - 1)


class SlotCache:
    """transformers' Cache protocol as its attention layers use it: `update(k, v, layer)` -> (k, v).

    Keys/values of slot s, position p live at [s, :, p] of one tensor per layer. Before each
    forward the engine sets `write` (slot and position of every input token) and `read` (None:
    the forward attends only to its own tokens, a prefill; (n, length): a decode step attends
    over the first n slots up to `length`, a view of the buffers, no copy).
    """

    is_compileable = False

    def __init__(self, config: Any, slots: int, length: int, dtype: Any, device: str):
        import torch  # lazily: importing newsray.generation stays light (model references, CLI)

        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.n_layers, self.slots, self.length = config.num_hidden_layers, slots, length
        shape = (slots, heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layers)]
        self.write: tuple[Any, Any] | None = None
        self.read: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def grow(self, length: int) -> None:
        """Make room for `length` positions per slot (a copy, once; rows in flight keep their cache)."""
        if length <= self.length:
            return
        for buf in (self.keys, self.values):
            for i, t in enumerate(buf):
                new = t.new_zeros((t.shape[0], t.shape[1], length, t.shape[3]))
                new[:, :, : self.length] = t
                buf[i] = new
        self.length = length

    def move(self, src: int, dst: int, upto: int) -> None:
        """Copy slot `src`'s first `upto` positions into slot `dst` (compaction)."""
        for buf in (self.keys, self.values):
            for t in buf:
                t[dst, :, :upto] = t[src, :, :upto]

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        slots, pos = self.write
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[slots, :, pos] = key_states.transpose(1, 2)  # [B, q, heads, dim] into [slot_b, :, pos_bq]
        v[slots, :, pos] = value_states.transpose(1, 2)
        if self.read is None:
            return key_states, value_states
        n, length = self.read
        return k[:n, :, :length], v[:n, :, :length]

    # What transformers may ask of a cache it did not build (the engine passes 4D masks and positions).
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.read is None else self.read[1]


class Engine:
    """Greedy continuous-batching decoding of `Request`s on one causal LM (see the module docstring)."""

    def __init__(self, model: Any, *, slots: int, stop_ids: Iterable[int], token_texts: list[str], pad_id: int,
                 device: str = "cpu", max_length: int = 2048,
                 context: Callable[[], AbstractContextManager[Any]] = nullcontext):
        self.model, self.slots, self.device = model, max(1, int(slots)), device
        self.stop_ids, self.texts, self.pad_id = set(stop_ids), token_texts, pad_id
        self.max_length, self.context = max_length, context
        self.cache: SlotCache | None = None
        self.rows: list[Request | None] = [None] * self.slots
        self._queue: deque[Request] = deque()
        self._resize = False
        self._closed = False
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for benchmarks and tests)
        import torch

        # torch.set_num_threads sets OpenMP's thread count of the calling thread; a new thread starts at one per
        # core until torch's first parallel op in it re-applies the count (lazily), so a GEMM before that runs
        # on every core. The engine's thread sets the count of the thread that built it before its first step.
        self.threads = torch.get_num_threads()

    # ------------------------------------------------------------------ public API

    def submit(self, req: Request) -> concurrent.futures.Future:
        """Queue a request; it joins the running batch at the next step. The future gives the Request back."""
        with self._cv:
            self._closed = False
            self._queue.append(req)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="newsray-engine", daemon=True)
                self._thread.start()
            self._cv.notify()
        return req.future

    def set_slots(self, slots: int) -> None:
        """Change how many rows decode together (live: more slots grow the cache once; fewer stop admitting above)."""
        slots = max(1, int(slots))
        with self._cv:
            if slots > len(self.rows):
                self.rows += [None] * (slots - len(self.rows))
                self._resize = True
            self.slots = slots

    def close(self) -> None:
        """Stop the engine's thread once the rows in flight are done (an evicted model); later submits restart it."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    def run(self, requests: list[Request]) -> list[Request]:
        """Queue every request (in this order) and wait for all of them."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while not self._queue and not any(self.rows):
                    if self._closed:
                        self._thread = None
                        return
                    self._cv.wait()
            try:
                with self.context():
                    self._step()
            except BaseException as e:
                log.exception("generation step failed")
                for s, r in enumerate(self.rows):
                    if r is not None:
                        self.rows[s] = None
                        if not r.future.done():
                            r.future.set_exception(e)

    def _admit(self) -> list[tuple[int, Request]]:
        """Waiting requests into free slots (lowest first), as many as fit."""
        admitted = []
        with self._cv:
            for s in range(self.slots):
                if not self._queue:
                    break
                if self.rows[s] is None:
                    req = self._queue.popleft()
                    while req.future.cancelled() and self._queue:
                        req = self._queue.popleft()
                    if req.future.cancelled():
                        break
                    self.rows[s] = req
                    req.admitted_step = self.steps
                    admitted.append((s, req))
        return admitted

    def _step(self) -> None:
        import torch

        admitted = self._admit()
        with torch.inference_mode():
            if admitted:
                self._prefill(admitted)
            active = [(s, r) for s, r in enumerate(self.rows) if r is not None]
            if active:
                self._decode(active)
            self._compact()

    def _ensure_cache(self, length: int) -> None:
        if self._resize and self.cache is not None:  # set_slots asked for more slots: a bigger cache, rows kept
            old, self.cache, self._resize = self.cache, None, False
            self._ensure_cache(max(length, old.length))
            for new, prev in ((self.cache.keys, old.keys), (self.cache.values, old.values)):
                for t, o in zip(new, prev):
                    t[: o.shape[0], :, : o.shape[2]] = o
            return
        if self.cache is None:
            dtype = next(self.model.parameters()).dtype
            self.cache = SlotCache(self.model.config, len(self.rows), max(length, min(256, self.max_length)), dtype, self.device)
            log.info("KV cache: %d slots x %d positions, %.0f MB", self.slots, self.cache.length, self.cache.nbytes / 2**20)
        elif length > self.cache.length:
            self.cache.grow(max(length, min(2 * self.cache.length, self.max_length)))  # doubling up to the window, never short of a row

    def _forward(self, ids: Any, positions: Any, mask: Any, last: Any) -> Any:
        """Logits at `last` (one position per row) of a forward writing into the slot cache."""
        import torch

        out = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                       past_key_values=self.cache, use_cache=True)
        hidden = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), last]
        return self.model.get_output_embeddings()(hidden)

    def _prefill(self, admitted: list[tuple[int, Request]]) -> None:
        """One right-padded forward over the new rows' prompts, writing their cache; then their first token."""
        import torch

        dev = self.device
        lens = [len(r.prompt) for _, r in admitted]
        width = max(lens)
        self._ensure_cache(max(len(r.prompt) + r.max_new_tokens for _, r in admitted))
        ids = torch.tensor([r.prompt + [self.pad_id] * (width - len(r.prompt)) for _, r in admitted], device=dev)
        pos = torch.arange(width, device=dev)
        valid = pos[None, :] < torch.tensor(lens, device=dev)[:, None]  # [B, width] real tokens
        causal = pos[None, :] <= pos[:, None]  # [q, k]
        mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, q, k]; pad queries see the real keys
        self.cache.write = (torch.tensor([s for s, _ in admitted], device=dev)[:, None], pos[None, :])
        self.cache.read = None
        logits = self._forward(ids, pos[None, :].expand(len(admitted), -1), mask, torch.tensor(lens, device=dev) - 1)
        self._choose([r for _, r in admitted], [s for s, _ in admitted], logits)

    def _decode(self, active: list[tuple[int, Request]]) -> None:
        """One token for every active slot (holes below the highest decode a pad, ignored)."""
        import torch

        dev = self.device
        hi = active[-1][0] + 1
        toks, where = [self.pad_id] * hi, [0] * hi
        for s, r in active:
            toks[s], where[s] = r.tokens[-1], r.cached
        length = max(where) + 1
        self._ensure_cache(length)
        pos = torch.tensor(where, device=dev)
        mask = (torch.arange(length, device=dev)[None, :] <= pos[:, None])[:, None, None, :]  # [hi, 1, 1, length]
        self.cache.write = (torch.arange(hi, device=dev)[:, None], pos[:, None])
        self.cache.read = (hi, length)
        logits = self._forward(torch.tensor(toks, device=dev)[:, None], pos[:, None], mask, torch.zeros(hi, dtype=torch.long, device=dev))
        self.steps += 1
        idx = [s for s, _ in active]
        self._choose([r for _, r in active], idx, logits[idx] if len(idx) < hi else logits)

    def _choose(self, rows: list[Request], slots: list[int], logits: Any) -> None:
        """Greedy next token per row (grammar-masked where a row has one); finished rows leave their slot."""
        masked = [i for i, r in enumerate(rows) if r.grammar is not None]
        if masked:
            logits = logits.clone()
            grammars = [rows[i].grammar for i in masked]
            logits[masked] = grammars[0].c.apply(grammars, logits[masked])  # one task's constraint per engine
        for s, r, tok in zip(slots, rows, logits.float().argmax(-1).tolist()):  # fp32 argmax: 2x faster than bf16 on CPU
            r.tokens.append(tok)
            done = True
            if tok in self.stop_ids:
                r.reason = "stop"
            elif r.scanner is not None and r.scanner.feed(self.texts[tok] if tok < len(self.texts) else ""):
                r.reason = "json_end"
            elif len(r.tokens) >= r.max_new_tokens:
                r.reason = "length"
            else:
                done = False
                if r.grammar is not None:
                    try:
                        r.grammar.consume(tok)
                    except GenerationError as e:  # this row's grammar failed: only this row ends, as data
                        r.reason, r.error, done = "error", str(e), True
            if done or r.future.cancelled():
                self.rows[s] = None
                r.finished_step = self.steps
                if not r.future.done():
                    r.future.set_result(r)

    def _compact(self) -> None:
        """With nothing queued, move the highest rows down into free slots so decode steps stay dense."""
        if self._queue or self.cache is None:
            return
        while True:
            holes = [s for s, r in enumerate(self.rows) if r is None]
            top = max((s for s, r in enumerate(self.rows) if r is not None), default=-1)
            if not holes or holes[0] > top:
                return
            dst, r = holes[0], self.rows[top]
            self.cache.move(top, dst, r.cached)
            self.rows[dst], self.rows[top] = r, None

