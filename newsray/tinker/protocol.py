"""Tinker wire formats: protobuf forward_backward requests/results and sample results, tinker:// paths.

The protobuf messages are the SDK's own generated ones (`tinker.proto.tinker_public_pb2`), so the
server speaks exactly what the pinned SDK writes and reads; a change of the SDK shows up as a failing
test, not as silent drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTO_CONTENT_TYPE = "application/x-protobuf"


class ProtocolError(ValueError):
    """A request the server cannot accept (answered with 400 naming the problem)."""


class NotFound(ProtocolError):
    """An unknown session, model, sampler, request or checkpoint (answered with 404)."""


class Gone(ProtocolError):
    """A finished session (answered with 410, which stops the SDK's heartbeat)."""


@dataclass
class DatumArrays:
    """One supervised datum: the input tokens and, per position, the target token and its weight."""

    tokens: list[int]
    target_tokens: list[int]
    weights: list[float]


def _pb() -> Any:
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


def _tensor(msg: Any, name: str) -> np.ndarray:
    pb = _pb()
    dtypes = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
    if msg.dtype not in dtypes:
        raise ProtocolError(f"loss_fn_inputs[{name!r}]: unsupported tensor dtype {msg.dtype}")
    if msg.WhichOneof("encoding") != "dense":
        raise ProtocolError(f"loss_fn_inputs[{name!r}]: sparse tensors are not implemented by this server; send dense 1-D tensors")
    arr = np.frombuffer(msg.dense, dtype=dtypes[msg.dtype])
    shape = list(msg.shape)
    if len(shape) > 1:
        raise ProtocolError(f"loss_fn_inputs[{name!r}]: shape {shape}: only 1-D per-token tensors are implemented (cross_entropy)")
    if shape and shape[0] != arr.size:
        raise ProtocolError(f"loss_fn_inputs[{name!r}]: shape {shape} does not match its {arr.size} values")
    return arr


def parse_forward_backward(body: bytes) -> tuple[Any, list[DatumArrays]]:
    """A protobuf ForwardBackwardRequest -> (the message, its datums as token/target/weight lists)."""
    from google.protobuf.message import DecodeError

    msg = _pb().ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as e:
        raise ProtocolError(f"forward_backward: the body is not a tinker ForwardBackwardRequest protobuf ({e})") from None
    if not msg.model_id:
        raise ProtocolError("forward_backward: model_id is missing")
    if msg.loss_fn != "cross_entropy":
        raise ProtocolError(f"forward_backward: loss_fn {msg.loss_fn!r} is not implemented by this server (only cross_entropy)")
    if not msg.data:
        raise ProtocolError("forward_backward: no data")
    datums = []
    for i, d in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in d.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise ProtocolError(f"forward_backward: datum {i}: only encoded_text chunks are implemented (no images/audio)")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        if "target_tokens" not in d.loss_fn_inputs:
            raise ProtocolError(f"forward_backward: datum {i} has no loss_fn_inputs['target_tokens']")
        targets = _tensor(d.loss_fn_inputs["target_tokens"], "target_tokens").astype(np.int64).tolist()
        if "weights" in d.loss_fn_inputs:
            weights = _tensor(d.loss_fn_inputs["weights"], "weights").astype(np.float64).tolist()
        else:
            weights = [1.0] * len(targets)
        if not tokens or len(targets) != len(tokens) or len(weights) != len(tokens):
            raise ProtocolError(f"forward_backward: datum {i}: {len(tokens)} input tokens, {len(targets)} target_tokens and "
                                f"{len(weights)} weights; they must be equal and non-zero")
        if not all(math.isfinite(w) for w in weights):
            raise ProtocolError(f"forward_backward: datum {i}: weights must be finite")
        datums.append(DatumArrays(tokens, targets, weights))
    return msg, datums


def _batched(arrays: list[np.ndarray]) -> Any:
    pb = _pb()
    data = np.concatenate(arrays).astype(np.float32) if arrays else np.zeros(0, np.float32)
    offsets = np.cumsum([0] + [a.size * 4 for a in arrays], dtype=np.int64)
    return pb.BatchedTensor(data=data.tobytes(), offsets=offsets.tobytes(), dtype=pb.DTYPE_FLOAT32)


def forward_backward_output(logprobs: list[np.ndarray], losses: list[np.ndarray], loss_sum: float) -> bytes:
    """The ForwardBackwardOutput protobuf: per-token `logprobs` and `elementwise_loss`, and `loss:sum`."""
    pb = _pb()
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(logprobs))
    record.fields["logprobs"].CopyFrom(_batched(logprobs))
    record.fields["elementwise_loss"].CopyFrom(_batched(losses))
    out = pb.ForwardBackwardOutput(loss_fn_output_type="newsray.tinker:ArrayRecord", loss_fn_outputs=[record])
    out.metrics["loss:sum"] = float(loss_sum)
    return out.SerializeToString()


def sample_output(sequences: list[dict[str, Any]], prompt_logprobs: list[float] | None) -> bytes:
    """The SampleResponse protobuf: tokens (int32), logprobs (float32) and stop reason per sequence."""
    pb = _pb()
    out = pb.SampleResponse()
    for s in sequences:
        seq = out.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if s["stop_reason"] == "stop" else pb.STOP_REASON_LENGTH
        seq.tokens = np.asarray(s["tokens"], dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(s["logprobs"], dtype=np.float32).tobytes()
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    return out.SerializeToString()


# tinker://<model_id>/<kind segment>/<name>
KIND_SEGMENTS = {"state": "weights", "sampler": "sampler_weights", "external": "external_weights"}


def tinker_path(model_id: str, kind: str, name: str) -> str:
    return f"tinker://{model_id}/{KIND_SEGMENTS[kind]}/{name}"


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """tinker://<model_id>/<segment>/<name> -> (model_id, kind, name)."""
    if not path.startswith("tinker://"):
        raise ProtocolError(f"path {path!r} is not a tinker:// path")
    parts = path[len("tinker://"):].split("/")
    kinds = {v: k for k, v in KIND_SEGMENTS.items()}
    if len(parts) != 3 or parts[1] not in kinds or not parts[0] or not parts[2]:
        raise ProtocolError(f"path {path!r}: expected tinker://<run>/weights|sampler_weights|external_weights/<name>")
    return parts[0], kinds[parts[1]], parts[2]
