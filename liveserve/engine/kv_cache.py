"""One session's KV cache: per-layer key/value storage plus the position of every cached token.

Storage is [layers, kv_heads, capacity, head_dim] for keys and values, grown by doubling up to a hard
`max_tokens` so a bounded policy reaches a fixed footprint and stays there. Appends write in place
(no recomputation of earlier tokens, ever); eviction compacts the kept tokens to the front.
"""

from __future__ import annotations

import torch

from liveserve.engine.rope import shift_keys


class CacheFullError(RuntimeError):
    """A step would exceed the cache's token limit; nothing was written."""


class KVCache:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device, initial_capacity: int = 256) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_tokens = max_tokens
        self.dtype, self.device = dtype, device
        self.length = 0  # committed tokens
        self._capacity = 0
        self.keys = self.values = torch.empty(0)
        self.positions = torch.empty(0, dtype=torch.long)
        self._grow(min(initial_capacity, max_tokens))

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.keys.element_size()

    def reserve(self, n: int) -> None:
        """Make room for n more tokens or raise CacheFullError before anything is written."""
        need = self.length + n
        if need > self.max_tokens:
            raise CacheFullError(f"cache holds {self.length} tokens; {n} more would pass its limit of {self.max_tokens}")
        if need > self._capacity:
            self._grow(min(max(need, 2 * self._capacity), self.max_tokens))

    def _grow(self, capacity: int) -> None:
        shape = (self.num_layers, self.num_kv_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        positions = torch.zeros(capacity, dtype=torch.long, device=self.device)
        if self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
            positions[: self.length] = self.positions[: self.length]
        self.keys, self.values, self.positions, self._capacity = keys, values, positions, capacity

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys/values [kv_heads, n, dim] after the committed tokens; return the
        layer's whole K/V including them. The length advances only in `commit`, once every layer wrote."""
        n = keys.shape[-2]
        end = self.length + n
        self.keys[layer, :, self.length:end] = keys
        self.values[layer, :, self.length:end] = values
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def commit(self, positions: torch.Tensor) -> None:
        n = positions.numel()
        self.positions[self.length:self.length + n] = positions
        self.length += n

    def kept_positions(self) -> torch.Tensor:
        return self.positions[: self.length]

    def close(self) -> None:
        """Drop the storage; the cache holds nothing afterwards."""
        self.keys = self.values = torch.empty(0, dtype=self.dtype, device=self.device)
        self.positions = torch.empty(0, dtype=torch.long, device=self.device)
        self.length, self._capacity, self.max_tokens = 0, 0, 0

    def truncate(self, n: int) -> None:
        """Drop the tokens from index n on: nothing moves, so the kept tokens are untouched."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n

    def keep(self, index: torch.Tensor, inv_freq: torch.Tensor | None, positions: torch.Tensor | None = None) -> None:
        """Keep only the tokens at `index`, moved to the front in that order. With `inv_freq`, the kept tokens
        take new `positions` (default 0..k-1, contiguous) and their keys are re-rotated to match; without,
        positions are kept."""
        index = index.to(self.device)
        k = index.numel()
        self.keys[:, :, :k] = self.keys[:, :, index]  # advanced indexing copies first: any order is safe
        self.values[:, :, :k] = self.values[:, :, index]
        old_positions = self.positions[index]
        if inv_freq is not None:
            new_positions = torch.arange(k, device=self.device) if positions is None else positions.to(self.device)
            shift = old_positions - new_positions
            moved = shift != 0
            if bool(moved.any()):
                self.keys[:, :, :k][:, :, moved] = shift_keys(self.keys[:, :, :k][:, :, moved], shift[moved], inv_freq)
            self.positions[:k] = new_positions
        else:
            self.positions[:k] = old_positions
        self.length = k
