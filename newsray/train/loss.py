"""The training loss: mean cross-entropy over the completion tokens, logits only where they count.

A causal LM's forward projects every position onto the vocabulary (49,152 columns for SmolLM2,
128,256 for Llama-3), then the loss ignores the prompt and padding positions. `completion_loss`
passes transformers' `logits_to_keep` a boolean mask of the positions that predict a label token,
so the LM head, the float32 logits and their softmax exist only there: the same loss, less work and
memory (docs/BENCHMARKS.md). It goes through the model's own forward, so DDP, DeepSpeed and PEFT
wrappers see an ordinary call.
"""

from __future__ import annotations

from typing import Any

from newsray.formatting import IGNORE_INDEX


def completion_loss(model: Any, batch: dict[str, Any], sliced_logits: bool = True) -> Any:
    """Mean cross-entropy over the label tokens of `batch` (input_ids, attention_mask, labels).

    sliced_logits=False is the plain `model(**batch).loss` (for backends whose forward does not
    take a `logits_to_keep` mask, e.g. Unsloth's patched one).
    """
    import torch.nn.functional as F

    if not sliced_logits:
        return model(**batch).loss
    labels = batch["labels"]
    predicts = labels.new_zeros(labels.shape, dtype=bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=predicts)
    logits = out.logits.float()  # (number of label tokens, vocab), row-major like the targets below
    return F.cross_entropy(logits, labels[:, 1:][predicts[:, :-1]])
