"""The Ray actor behind `newsray tinker-server`: PEFT LoRA models, forward/backward, AdamW, sampling.

One actor owns every training model (one PEFT model + AdamW per model id) and the sampling models
(one frozen base per offered model with the sampler snapshots loaded as named adapters). Ray runs an
actor's calls one at a time in submission order, and the server submits each model's requests in
seq_id order, so a model sees exactly the request order its client asked for.

The loss is Tinker's `cross_entropy`: sum over positions of -weights * logprob(target_token), with
gradients accumulated across forward_backward calls until optim_step (as the service does).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
LORA_ALPHA = 32  # Tinker's LoRA alpha is fixed at 32 whatever the rank (tinker-cookbook's convention)
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "tinker_meta.json"


class TinkerWorker:
    """Held by a Ray actor (`ray.remote(TinkerWorker)`); every public method is one server request."""

    def __init__(self, offered: dict[str, str], num_threads: int = 1, device: str = "cpu"):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.offered, self.device = offered, device
        self.models: dict[str, dict[str, Any]] = {}
        self.samplers: dict[str, Any] = {}  # base model name -> PeftModel holding the sampler adapters
        self.tokenizers: dict[str, Any] = {}

    # ------------------------------------------------------------------ models
    def _model_config(self, base_model: str) -> Any:
        from newsray.config import ModelConfig

        return ModelConfig(name=self.offered[base_model], dtype="float32")

    def _tokenizer(self, base_model: str) -> Any:
        if base_model not in self.tokenizers:
            from newsray.models import load_tokenizer

            self.tokenizers[base_model] = load_tokenizer(self._model_config(base_model))
        return self.tokenizers[base_model]

    def info(self, base_model: str) -> dict[str, Any]:
        """What get_info / get_tokenizer need: architecture and a tokenizer the client can load."""
        from newsray.models import resolve_model

        tok = self._tokenizer(base_model)
        return {"arch": "llama", "tokenizer_id": resolve_model(self.offered[base_model]).source, "vocab_size": len(tok)}

    def create_model(self, model_id: str, base_model: str, rank: int, seed: int | None, train_attn: bool, train_mlp: bool,
                     train_unembed: bool) -> dict[str, Any]:
        import torch
        from peft import LoraConfig, TaskType, get_peft_model

        from newsray.models import load_model

        targets = (ATTN if train_attn else []) + (MLP if train_mlp else []) + (["lm_head"] if train_unembed else [])
        if seed is not None:
            torch.manual_seed(seed)
        base = load_model(self._model_config(base_model), self.device)
        base.config.use_cache = False
        lora = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets, task_type=TaskType.CAUSAL_LM)
        model = get_peft_model(base, lora)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        self.models[model_id] = {"model": model, "optimizer": opt, "params": params, "base_model": base_model, "rank": rank,
                                 "steps": 0, "vocab": model.get_input_embeddings().weight.shape[0]}
        return {"model_id": model_id, "trainable_params": sum(p.numel() for p in params)}

    def _get(self, model_id: str) -> dict[str, Any]:
        if model_id not in self.models:
            raise KeyError(f"unknown model_id {model_id!r}")
        return self.models[model_id]

    def drop_model(self, model_id: str) -> None:
        self.models.pop(model_id, None)

    # ------------------------------------------------------------------ training
    def forward_backward(self, model_id: str, datums: list[Any], forward_only: bool) -> dict[str, Any]:
        """Tinker cross_entropy over a batch of datums; gradients accumulate until optim_step."""
        import torch

        m = self._get(model_id)
        model, vocab = m["model"], m["vocab"]
        for i, d in enumerate(datums):
            bad = [t for t in (*d.tokens, *d.target_tokens) if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"datum {i}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        width = max(len(d.tokens) for d in datums)
        ids = torch.zeros(len(datums), width, dtype=torch.long)
        tgt = torch.zeros(len(datums), width, dtype=torch.long)
        w = torch.zeros(len(datums), width, dtype=torch.float32)
        mask = torch.zeros(len(datums), width, dtype=torch.long)
        for i, d in enumerate(datums):
            n = len(d.tokens)
            ids[i, :n], tgt[i, :n] = torch.tensor(d.tokens), torch.tensor(d.target_tokens)
            w[i, :n], mask[i, :n] = torch.tensor(d.weights, dtype=torch.float32), 1
        t0 = time.perf_counter()
        model.train()
        with torch.set_grad_enabled(not forward_only):
            logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, tgt.to(self.device).unsqueeze(-1)).squeeze(-1)
            elementwise = -logp * w.to(self.device)
            loss = elementwise.sum()
            if not forward_only:
                loss.backward()
        logp, elementwise = logp.detach().cpu(), elementwise.detach().cpu()
        return {"logprobs": [logp[i, :len(d.tokens)].numpy() for i, d in enumerate(datums)],
                "losses": [elementwise[i, :len(d.tokens)].numpy() for i, d in enumerate(datums)],
                "loss_sum": float(loss.detach()), "tokens": int(mask.sum()), "seconds": time.perf_counter() - t0}

    def optim_step(self, model_id: str, params: dict[str, float]) -> dict[str, float]:
        """One AdamW step (decoupled weight decay, as torch.optim.AdamW) with the request's hyperparameters."""
        import torch

        m = self._get(model_id)
        opt = m["optimizer"]
        for g in opt.param_groups:
            g.update(lr=params["learning_rate"], betas=(params["beta1"], params["beta2"]), eps=params["eps"],
                     weight_decay=params["weight_decay"])
        clip = params.get("grad_clip_norm", 0.0)
        norm = torch.nn.utils.clip_grad_norm_(m["params"], clip if clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        m["steps"] += 1
        return {"grad_norm:mean": float(norm) if math.isfinite(float(norm)) else -1.0}

    # ------------------------------------------------------------------ checkpoints
    def save(self, model_id: str, directory: str, with_optimizer: bool) -> int:
        """The PEFT adapter directory (+ optimizer state for training checkpoints); returns its size in bytes."""
        import torch

        m = self._get(model_id)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        m["model"].save_pretrained(str(out))
        if with_optimizer:
            torch.save({"optimizer": m["optimizer"].state_dict(), "steps": m["steps"]}, out / OPTIMIZER_FILE)
        (out / META_FILE).write_text(json.dumps({"base_model": m["base_model"], "rank": m["rank"], "model_id": model_id,
                                                 "steps": m["steps"]}))
        return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())

    def load(self, model_id: str, directory: str, optimizer: bool) -> dict[str, Any]:
        """Load a training checkpoint's LoRA weights (and optimizer state) into an existing model."""
        import torch

        from newsray.train.checkpoint import load_adapter_weights

        m = self._get(model_id)
        load_adapter_weights(m["model"], Path(directory))
        if optimizer:
            state = torch.load(Path(directory) / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
            m["optimizer"].load_state_dict(state["optimizer"])
            m["steps"] = state["steps"]
        m["optimizer"].zero_grad(set_to_none=True)
        return {"model_id": model_id, "steps": m["steps"]}

    # ------------------------------------------------------------------ sampling
    def _sampler(self, base_model: str, adapter: str | None, directory: str | None) -> tuple[Any, Any]:
        """(model, context): one frozen base per offered model; sampler snapshots are named adapters on it."""
        import contextlib

        from peft import PeftModel

        from newsray.models import load_model

        model = self.samplers.get(base_model)
        if model is None:
            model = load_model(self._model_config(base_model), self.device)
            self.samplers[base_model] = model
        if adapter is None:
            ctx = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
            return model.eval(), ctx
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, directory, adapter_name=adapter, is_trainable=False)
            self.samplers[base_model] = model
        elif adapter not in model.peft_config:
            model.load_adapter(directory, adapter_name=adapter, is_trainable=False)
        model.set_adapter(adapter)
        return model.eval(), contextlib.nullcontext()

    def sample(self, base_model: str, adapter: str | None, directory: str | None, prompt: list[int], num_samples: int,
               params: dict[str, Any], prompt_logprobs: bool) -> dict[str, Any]:
        """Autoregressive sampling (greedy at temperature 0) with a KV cache; stops on EOS/end-of-turn or `stop`."""
        import torch

        model, ctx = self._sampler(base_model, adapter, directory)
        tok = self._tokenizer(base_model)
        vocab = model.get_input_embeddings().weight.shape[0]
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"the prompt must be non-empty token ids in 0..{vocab - 1}")
        stop = params.get("stop")
        stop_ids, stop_strs = set(), []
        if stop is None:
            from newsray.formatting import Formatter

            stop_ids = set(Formatter.for_tokenizer(tok, 1 << 20).stop_token_ids())
        elif isinstance(stop, str):
            stop_strs = [stop]
        else:
            stop_ids = {s for s in stop if isinstance(s, int)}
            stop_strs = [s for s in stop if isinstance(s, str)]
        max_tokens = int(params.get("max_tokens") or 64)
        temperature, top_k, top_p = float(params.get("temperature", 1.0)), int(params.get("top_k", -1)), float(params.get("top_p", 1.0))
        gen = torch.Generator().manual_seed(int(params["seed"])) if params.get("seed") is not None else None
        ids = torch.tensor([prompt], device=self.device)
        sequences, plp = [], None
        with torch.no_grad(), ctx:
            out = model(input_ids=ids, use_cache=True)
            if prompt_logprobs:
                lp = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
                plp = [float("nan")] + lp.cpu().tolist()
            for _ in range(num_samples):
                past, logits = _copy_cache(out.past_key_values), out.logits[0, -1].float()
                tokens, logprobs, reason = [], [], "length"
                for _ in range(max_tokens):
                    logp = torch.log_softmax(logits, -1)
                    nxt = _choose(logp, temperature, top_k, top_p, gen)
                    tokens.append(nxt)
                    logprobs.append(float(logp[nxt]))
                    if nxt in stop_ids or (stop_strs and any(s in tok.decode(tokens) for s in stop_strs)):
                        reason = "stop"
                        break
                    step = model(input_ids=torch.tensor([[nxt]], device=self.device), past_key_values=past, use_cache=True)
                    past, logits = step.past_key_values, step.logits[0, -1].float()
                sequences.append({"tokens": tokens, "logprobs": logprobs, "stop_reason": reason})
        return {"sequences": sequences, "prompt_logprobs": plp}


def _copy_cache(cache: Any) -> Any:
    import copy

    return copy.deepcopy(cache)


def _choose(logp: Any, temperature: float, top_k: int, top_p: float, gen: Any) -> int:
    """Greedy at temperature 0, else sampling from the temperature / top-k / top-p filtered distribution."""
    import torch

    if temperature <= 0:
        return int(logp.argmax())
    scores = logp / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, -1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
