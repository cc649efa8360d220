"""Tensors in internal messages: raw bytes in the tensor's own dtype, plus shape and dtype name.

Frames of one push travel as one stacked tensor (one buffer, not one message per frame) and come back
as row views of it, without a copy per row.
"""

from __future__ import annotations

import torch

from liveserve.internal.v2 import tensor_pb2

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
    shape = tuple(message.shape)
    expected = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    if len(message.data) != expected:
        raise ValueError(f"tensor of shape {shape} and dtype {message.dtype} needs {expected} bytes, "
                         f"got {len(message.data)}")
    if not expected:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(message.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def pack(rows: list[torch.Tensor]) -> tensor_pb2.Tensor | None:
    """Rows -> one tensor message (None for no rows): stacked when they share a shape, else one after
    another with their shapes (`row_shapes`)."""
    if not rows:
        return None
    rows = [row.detach().to("cpu") for row in rows]
    if all(row.shape == rows[0].shape for row in rows):
        return to_message(torch.stack(rows))
    if any(row.dim() != rows[0].dim() for row in rows):
        raise ValueError("rows of different ranks cannot travel in one tensor")
    message = to_message(torch.cat([row.reshape(-1) for row in rows]))
    message.row_shapes.extend(size for row in rows for size in row.shape)
    return message


def unpack(message: tensor_pb2.Tensor, count: int) -> list[torch.Tensor]:
    """A tensor message from `pack` -> its `count` rows (views of one buffer)."""
    if count == 0:
        return []
    if message.row_shapes:
        return _unpack_rows(message, count)
    stacked = from_message(message)
    if stacked.dim() < 1 or stacked.shape[0] != count:
        raise ValueError(f"expected {count} stacked rows, got a tensor of shape {tuple(stacked.shape)}")
    return list(stacked.unbind(0))


def _unpack_rows(message: tensor_pb2.Tensor, count: int) -> list[torch.Tensor]:
    """Rows of different shapes, one after another."""
    flat, dims = from_message(message), list(message.row_shapes)
    if flat.dim() != 1 or len(dims) % count:
        raise ValueError(f"{len(dims)} row dimensions do not describe {count} rows of a flat tensor")
    rank = len(dims) // count
    shapes = [torch.Size(dims[i:i + rank]) for i in range(0, len(dims), rank)]
    sizes = [shape.numel() for shape in shapes]
    if sum(sizes) != flat.numel():
        raise ValueError(f"rows of {sum(sizes)} elements in a tensor of {flat.numel()}")
    return [row.view(shape) for row, shape in zip(flat.split(sizes), shapes)]
