"""The training stage: Ray Train workers fine-tune LoRA adapters (hf or unsloth backend)."""

from newsray.train.driver import TrainResult, train

__all__ = ["TrainResult", "train"]
