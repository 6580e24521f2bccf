"""Ollama Modelfiles derived from the model's own chat template, so Ollama prompts as training did.

The chat template (Jinja, run by transformers) is rendered once with sentinel messages; the text
around each sentinel gives every role's prefix, the end-of-turn suffix and the generation prompt.
From those pieces an Ollama TEMPLATE (Go text/template over `.Messages`) is written that renders
the same prompt text for any system/user/assistant conversation. The template's default system
prompt (SmolLM2 inserts one when a conversation has none: training saw it) becomes SYSTEM, so a
request without a system message is prompted exactly as in training. The stop tokens are the
end-of-turn token and EOS; decoding is greedy (temperature 0), as newsray evaluates and serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from newsray.errors import ModelError
from newsray.formatting import TEMPLATE_KWARGS, end_of_turn_token

_S, _U1, _A1, _U2 = "\x01SYSTEM\x01", "\x01USER1\x01", "\x01ASSISTANT1\x01", "\x01USER2\x01"
_PROBE = "\x01PROBE\x01"


@dataclass(frozen=True)
class ChatPieces:
    """The literal text a chat template puts around each message."""

    head: str  # once, before everything (BOS, when the template writes it)
    system: str  # prefix of a system message
    user: str
    assistant: str
    end: str  # after every message (the end-of-turn token and what follows it)
    generation: str  # the generation prompt (assistant turn opened)
    default_system: str | None  # what the template writes as system content when there is no system message
    stops: tuple[str, ...]


def _render(tokenizer: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **TEMPLATE_KWARGS)


def chat_pieces(tokenizer: Any) -> ChatPieces:
    """Take the chat template apart (ModelError if it is not a per-message template Ollama can express)."""
    msgs = [{"role": "system", "content": _S}, {"role": "user", "content": _U1},
            {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}]
    full, closed = _render(tokenizer, msgs, True), _render(tokenizer, msgs, False)
    marks = [_S, _U1, _A1, _U2]
    at = [full.find(m) for m in marks]
    if not full.startswith(closed) or -1 in at or at != sorted(at):
        raise ModelError("the chat template does not render each message's content in order; write the Ollama TEMPLATE by hand.")
    generation = full[len(closed):]
    seg = [full[: at[0]]] + [full[at[i] + len(marks[i]): at[i + 1]] for i in range(3)] + [closed[at[3] + len(_U2):]]
    end = seg[4]  # after the last user message of the closed rendering
    if not (seg[1].startswith(end) and seg[2].startswith(end) and seg[3].startswith(end)):
        raise ModelError("the chat template ends system, user and assistant turns differently; write the Ollama TEMPLATE by hand.")
    user, assistant = seg[1][len(end):], seg[2][len(end):]
    if seg[3][len(end):] != user:
        raise ModelError("the chat template opens user turns differently; write the Ollama TEMPLATE by hand.")
    head, system = "", seg[0]
    bos = getattr(tokenizer, "bos_token", None)
    if bos and system.startswith(bos) and not user.startswith(bos):  # a BOS written once (Llama-3), not ChatML's
        head, system = bos, system[len(bos):]  # <|im_start|> (SmolLM2's "bos"): llama.cpp adds it (add_bos_token)
    # With no system message: what (if anything) the template puts first.
    alone = _render(tokenizer, [{"role": "user", "content": _PROBE}], True)
    body = alone[len(head):] if head and alone.startswith(head) else alone
    default = None
    if body.startswith(system) and not body.startswith(user):
        rest = body[len(system):]
        cut = rest.find(end + user)
        if cut < 0:
            raise ModelError("cannot find the default system prompt of the chat template; write the Ollama TEMPLATE by hand.")
        default = rest[:cut]
    elif not body.startswith(user):
        raise ModelError("the chat template writes something unexpected before the first user turn; write the Ollama TEMPLATE by hand.")
    eot = end_of_turn_token(tokenizer)
    stops = tuple(dict.fromkeys(t for t in (eot, tokenizer.eos_token) if t))
    return ChatPieces(head, system, user, assistant, end, generation, default, stops)


def _literal(text: str) -> str:
    """Text as it stands in a Go template (only `{{` would be read as an action)."""
    return text.replace("{{", '{{"{{"}}')


def go_template(p: ChatPieces) -> str:
    """The Ollama TEMPLATE: the same text as the chat template for a conversation in `.Messages`."""
    L = _literal
    first = ""
    if p.default_system == "":  # the template always writes a system block, empty when none is given
        first = f'{{{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}{L(p.system)}{L(p.end)}{{{{ end }}}}'
    return (f"{first}{{{{ range .Messages }}}}"
            f'{{{{ if eq .Role "system" }}}}{L(p.system)}{{{{ .Content }}}}{L(p.end)}'
            f'{{{{ else if eq .Role "user" }}}}{L(p.user)}{{{{ .Content }}}}{L(p.end)}'
            f'{{{{ else if eq .Role "assistant" }}}}{L(p.assistant)}{{{{ .Content }}}}{L(p.end)}'
            f"{{{{ end }}}}{{{{ end }}}}{L(p.generation)}")


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ModelError('the chat template contains """, which a Modelfile cannot quote; write the Modelfile by hand.')
    return f'"""{text}"""'


def modelfile(pieces: ChatPieces, source: str, num_ctx: int, header: list[str], adapter: str | None = None) -> str:
    """A Modelfile: FROM the GGUF (or the base, with ADAPTER), TEMPLATE, SYSTEM, stops, greedy decoding."""
    lines = [f"# {h}" for h in header]
    lines += [f"FROM {source}"]
    if adapter:
        lines += [f"ADAPTER {adapter}"]
    lines += [f"TEMPLATE {_quoted(go_template(pieces))}"]
    if pieces.default_system:
        lines += [f"SYSTEM {_quoted(pieces.default_system)}"]
    lines += [f'PARAMETER stop "{s}"' for s in pieces.stops]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"
