"""A Tinker-compatible API server backed by real LoRA training on a Ray actor (`newsray tinker-server`).

protocol.py  the wire formats the pinned `tinker` SDK (0.38.0) speaks: JSON bodies validated with the
             SDK's own pydantic types, forward_backward / sample payloads as the SDK's protobuf messages
worker.py    the Ray actor that holds the PEFT LoRA models, runs forward/backward, AdamW and sampling
server.py    the FastAPI app: auth, body limits, futures with try-again polling, checkpoints on disk
"""

SDK_VERSION = "0.38.0"
