"""Chat formatting and loss masking: the one source of truth for training, evaluation and serving.

The prompt is the model's own chat template applied to the user turn with the generation
prompt (`<|im_start|>assistant\\n` for ChatML, `<|start_header_id|>assistant<|end_header_id|>\\n\\n`
for Llama-3). A training example is that prompt's tokens followed by the answer's tokens and
the template's end-of-turn token. Labels are built by position, not by token id: exactly the
answer plus the end-of-turn token carry labels, everything else is -100. Because masking never
looks at token ids, pad == eos cannot mask the stop token.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from newsray.errors import ModelError

IGNORE_INDEX = -100
# Llama-3.x templates print "Today Date: <today>" unless given a date: a fixed one keeps the
# prompt byte-identical between a training run and a later inference (other templates ignore it).
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}


def ensure_chat_template(tokenizer: Any, override: str | None = None) -> Any:
    """Give the tokenizer its chat template: an override file, its own, or Llama-3's for a base Llama-3."""
    if override:
        path = Path(override)
        if not path.is_file():
            raise ModelError(f"model.chat_template: the chat template file {path} does not exist.")
        tokenizer.chat_template = path.read_text()
    elif not getattr(tokenizer, "chat_template", None):
        if "<|eot_id|>" in tokenizer.get_vocab():
            # Base Llama-3.x checkpoints ship no template; the instruct models' format is the standard.
            tokenizer.chat_template = resources.files("newsray.templates").joinpath("llama3.jinja").read_text()
        else:
            raise ModelError("the tokenizer has no chat template; set model.chat_template to a Jinja template file.")
    return tokenizer


def build_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The inference prompt: chat template + generation prompt, as text."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **TEMPLATE_KWARGS)


def render_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The whole conversation as the template renders it (no generation prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, **TEMPLATE_KWARGS)


def end_of_turn_token(tokenizer: Any) -> str:
    """The special token the template closes an assistant turn with (<|im_end|>, <|eot_id|>, ...)."""
    probe = [{"role": "user", "content": "x"}]
    prompt = build_prompt(tokenizer, probe)
    full = render_conversation(tokenizer, probe + [{"role": "assistant", "content": "ANSWER"}])
    if not full.startswith(prompt + "ANSWER"):
        raise ModelError("the chat template does not render the assistant answer right after the generation prompt; set model.chat_template to a template that does.")
    suffix = full[len(prompt) + len("ANSWER"):]
    specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})), key=len, reverse=True)
    for tok in specials:
        if tok and suffix.startswith(tok):
            return tok
    if tokenizer.eos_token:
        return tokenizer.eos_token
    raise ModelError("cannot tell which token ends an assistant turn in this chat template; set model.chat_template.")


@dataclass(frozen=True)
class Formatter:
    """Formats prompts and training examples for one tokenizer."""

    tokenizer: Any
    max_seq_length: int
    eot_token: str
    eot_id: int

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, max_seq_length: int) -> "Formatter":
        eot = end_of_turn_token(tokenizer)
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        if eot_id is None or eot_id == tokenizer.unk_token_id:
            raise ModelError(f"the end-of-turn token {eot!r} is not in the vocabulary.")
        return cls(tokenizer, max_seq_length, eot, eot_id)

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The inference prompt text (byte-identical to the training prefix)."""
        return build_prompt(self.tokenizer, messages)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the inference prompt (the template already carries any BOS)."""
        return self.tokenizer(self.prompt(messages), add_special_tokens=False)["input_ids"]

    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: the end-of-turn token, and EOS if different."""
        ids = [self.eot_id]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def example(self, messages: list[dict[str, str]], answer: str) -> dict[str, list[int]] | None:
        """input_ids / attention_mask / labels for prompt + answer + end-of-turn; None if too long."""
        prompt = self.prompt_ids(messages)
        completion = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eot_id]
        if len(prompt) + len(completion) > self.max_seq_length:
            return None
        return {
            "input_ids": prompt + completion,
            "attention_mask": [1] * (len(prompt) + len(completion)),
            "labels": [IGNORE_INDEX] * len(prompt) + completion,
        }

    def training_text(self, messages: list[dict[str, str]], answer: str) -> str:
        """What the template renders for the whole conversation (for checks and display)."""
        return render_conversation(self.tokenizer, messages + [{"role": "assistant", "content": answer}])


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int, side: str = "right") -> dict[str, list[list[int]]]:
    """Pad a batch by position: labels with -100, attention with 0, ids with `pad_id`."""
    width = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out: dict[str, list[list[int]]] = {k: [] for k in rows[0]}
    for r in rows:
        n = width - len(r["input_ids"])
        for k, seq in r.items():
            pad = [fill[k]] * n
            out[k].append(seq + pad if side == "right" else pad + seq)
    return out
