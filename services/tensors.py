"""Tensors in internal messages: frame features travel between services as raw bytes plus shape/dtype."""

from __future__ import annotations

import torch

from liveserve.internal.v1 import tensor_pb2

_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "uint8")}


def to_message(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    tensor = tensor.detach().to("cpu").contiguous()
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"cannot send a {name} tensor; supported: {', '.join(_DTYPES)}")
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()  # byte view: works for bfloat16 too
    return tensor_pb2.Tensor(shape=list(tensor.shape), dtype=name, data=data)


def from_message(message: tensor_pb2.Tensor) -> torch.Tensor:
    dtype = _DTYPES.get(message.dtype)
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {message.dtype!r}")
    raw = torch.frombuffer(bytearray(message.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(tuple(message.shape))
