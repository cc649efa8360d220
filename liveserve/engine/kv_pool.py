"""One device-resident KV pool per model replica, shared by many sessions in fixed-size blocks.

Layout: keys and values are [layers, slots, kv_heads, head_dim] with slots = blocks * block_size. A
session's cache is a list of blocks (its block table); logical token
i lives in slot table[i // block_size] * block_size + i % block_size. Blocks come from a free list, so
sessions join and leave between steps without moving anyone else's memory.

Admission reserves a session's worst case up front (its cache policy's token limit, in whole blocks)
and refuses a session whose reservation does not fit; blocks are then taken lazily as the cache grows.
Because reservations never exceed the pool, an admitted session can always grow to its limit: no
neighbour can starve it, and nothing is ever evicted from one session to make room for another.

A session stepped on its own (Session.step_alone, `liveserve run`) has a pool of its own
(`KVPool.for_session`) whose storage starts small and doubles as its blocks are taken, up to the
session's limit: the same cache and attention path as many sessions, without reserving the worst case
up front.
"""

from __future__ import annotations

import torch

from liveserve.config import PoolConfig
from liveserve.model.forward.rope import shift_keys


CPU_BUDGET_BYTES = 1 << 30  # host memory is shared with everything else: a fixed, modest default


def default_budget_bytes(device: torch.device, memory_fraction: float = 0.9) -> int:
    """On CUDA, `memory_fraction` of the device memory free now (the weights are loaded before the pool, so
    this is the memory left after them); on CPU a fixed 1 GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * memory_fraction)
    return CPU_BUDGET_BYTES


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor planned on the host, on `device`: on CUDA from pinned memory without waiting for the copy
    (a pageable copy would block the host until it is done)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class PoolFullError(RuntimeError):
    """Admitting a session would over-commit the pool; nothing was allocated."""


class CacheFullError(RuntimeError):
    """A step would exceed the cache's token limit; nothing was written."""


class KVPool:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, budget_tokens: int, block_size: int = 16,
                 initial_tokens: int | None = None) -> None:
        """`initial_tokens`: allocate storage for this many tokens and double it as blocks are taken, up to
        the budget (None: the whole budget at once, as a serving replica does)."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if budget_tokens < block_size:
            raise ValueError(f"the pool budget of {budget_tokens} tokens is less than one block of {block_size}")
        self.block_size = block_size
        self.num_blocks = budget_tokens // block_size
        self.device, self.dtype = torch.device(device), dtype
        allocated = self.num_blocks if initial_tokens is None else min(self.num_blocks, self.blocks_for(initial_tokens))
        # The gathering kernels never read a slot no token was written to, so the storage is not zeroed
        # (untouched memory costs nothing); `zero` for the kernels that read whole blocks in place.
        self.keys = torch.empty(num_layers, allocated * block_size, num_kv_heads, head_dim, dtype=dtype,
                                device=self.device)
        self.values = torch.empty_like(self.keys)
        self.allocated_blocks = allocated
        self._free = list(range(allocated - 1, -1, -1))  # a stack: low block ids are handed out first
        self._zeroed = False
        self.reserved_blocks = 0
        self.num_caches = 0

    @classmethod
    def for_model(cls, model, config: PoolConfig) -> KVPool:
        """A pool shaped for `model`'s KV heads, sized by `config` (tokens, bytes, or a device default)."""
        element = torch.empty(0, dtype=model.dtype).element_size()
        per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * element
        tokens = config.budget_tokens
        if tokens is None:
            tokens = (config.budget_bytes or default_budget_bytes(model.device, config.memory_fraction)) // per_token
        return cls(num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                   dtype=model.dtype, device=model.device, budget_tokens=tokens, block_size=config.block_size)

    @classmethod
    def for_session(cls, model, max_tokens: int, block_size: int = 16) -> KVPool:
        """A pool of one session's own, growing with its cache up to `max_tokens` (see module docs)."""
        budget = -(-max_tokens // block_size) * block_size
        return cls(num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                   dtype=model.dtype, device=model.device, budget_tokens=budget, block_size=block_size,
                   initial_tokens=min(budget, 256))

    # ---- accounting ----------------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int:
        _, _, heads, dim = self.keys.shape
        return 2 * self.keys.shape[0] * heads * dim * self.keys.element_size()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        """The storage allocated now (a growing pool's reaches `capacity_tokens` only if it has to)."""
        return self.allocated_blocks * self.block_size * self.bytes_per_token

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def reserved_fraction(self) -> float:
        """Share of the blocks promised to admitted sessions: what admission (and placement) goes by."""
        return self.reserved_blocks / self.num_blocks

    @property
    def used_fraction(self) -> float:
        return self.used_blocks / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_admit(self, max_tokens: int) -> bool:
        return self.reserved_blocks + self.blocks_for(max_tokens) <= self.num_blocks

    def sessions_admitted(self, max_tokens: int) -> int:
        """How many sessions reserving `max_tokens` each the empty pool admits."""
        return self.num_blocks // self.blocks_for(max_tokens)

    # ---- sessions --------------------------------------------------------------------------------

    def zero(self) -> None:
        """Make every slot finite: a kernel reading whole blocks in place (flex) meets slots no token was
        written to yet (a block's tail; on the CPU, the whole pool), and garbage there (NaN, inf) would
        leak through a zero attention weight."""
        self.keys.zero_()
        self.values.zero_()
        self._zeroed = True

    def open_cache(self, max_tokens: int) -> PagedCache:
        """Reserve room for a cache of up to `max_tokens` tokens or raise PoolFullError."""
        need = self.blocks_for(max_tokens)
        if self.reserved_blocks + need > self.num_blocks:
            free = (self.num_blocks - self.reserved_blocks) * self.block_size
            raise PoolFullError(
                f"the session's cache policy needs up to {need * self.block_size} KV tokens "
                f"({need * self.block_size * self.bytes_per_token / 2**20:.1f} MiB) but only {free} of the pool's "
                f"{self.capacity_tokens} are unreserved ({self.num_caches} sessions hold the rest); "
                "retry later, use another replica, or lower the session's window")
        self.reserved_blocks += need
        self.num_caches += 1
        return PagedCache(self, max_tokens, need)

    def _take_block(self) -> int:
        if not self._free:  # a growing pool: every block taken is covered by a reservation, so it may grow
            self._grow()
        return self._free.pop()

    def _grow(self) -> None:
        """Double the storage (up to the budget); blocks keep their ids, so block tables stay valid."""
        old, new = self.allocated_blocks, min(self.num_blocks, 2 * self.allocated_blocks)
        make = torch.zeros if self._zeroed else torch.empty
        for name in ("keys", "values"):
            current = getattr(self, name)
            grown = make(current.shape[0], new * self.block_size, *current.shape[2:], dtype=self.dtype,
                         device=self.device)
            grown[:, : old * self.block_size] = current
            setattr(self, name, grown)
        self._free = list(range(new - 1, old - 1, -1)) + self._free
        self.allocated_blocks = new

    def _give_back(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def _close(self, cache: PagedCache) -> None:
        self._give_back(cache.blocks)
        self.reserved_blocks -= cache.reserved_blocks
        self.num_caches -= 1


class PagedCache:
    """One session's cache inside a KVPool: its block table and every cached token's position. A
    PackedStep writes the keys and values of all sessions of a step at once."""

    def __init__(self, pool: KVPool, max_tokens: int, reserved_blocks: int) -> None:
        self.pool, self.max_tokens, self.reserved_blocks = pool, max_tokens, reserved_blocks
        self.blocks: list[int] = []
        self.length = 0
        self.closed = False
        # RoPE position of every cached token, on the host: planning and eviction read them without waiting
        # for the device (small: kept per session, grown by doubling).
        self.positions = torch.zeros(min(256, max_tokens), dtype=torch.long)

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    @property
    def nbytes(self) -> int:
        return self.capacity * self.pool.bytes_per_token

    def reserve(self, n: int) -> None:
        """Take blocks for n more tokens or raise CacheFullError before anything is written."""
        need = self.length + n
        if self.closed:
            raise CacheFullError("cache is closed")
        if need > self.max_tokens:
            raise CacheFullError(f"cache holds {self.length} tokens; {n} more would pass its limit of {self.max_tokens}")
        if need > self.capacity:
            while self.capacity < need:
                self.blocks.append(self.pool._take_block())

    def slots(self, start: int, n: int) -> torch.Tensor:
        """Pool slot indices of logical tokens start .. start+n-1 (blocks must already be reserved), on the
        host."""
        return self.slots_of(torch.arange(start, start + n))

    def slots_of(self, index: torch.Tensor) -> torch.Tensor:
        """Pool slots of the logical tokens at `index` (a host tensor), on the host."""
        size = self.pool.block_size
        return torch.tensor(self.blocks, dtype=torch.long)[index // size] * size + index % size

    def commit(self, positions: torch.Tensor) -> None:
        """The step's keys/values are in the pool (written by PackedStep); record positions, advance."""
        end = self.length + positions.numel()
        if end > self.positions.numel():
            grown = torch.zeros(min(max(end, 2 * self.positions.numel()), self.max_tokens), dtype=torch.long)
            grown[: self.length] = self.positions[: self.length]
            self.positions = grown
        self.positions[self.length:end] = positions
        self.length = end

    def kept_positions(self) -> torch.Tensor:
        return self.positions[: self.length]

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the cached keys and values, [layers, tokens, kv_heads, head_dim] in cache order
        (tests and debugging)."""
        slots = self.slots(0, self.length).to(self.pool.device)
        return self.pool.keys[:, slots], self.pool.values[:, slots]

    def keep(self, index: torch.Tensor, inv_freq: torch.Tensor | None, positions: torch.Tensor | None = None) -> None:
        """Keep only the tokens at `index`, moved to the front in that order, and return the blocks past
        them to the pool. With `inv_freq`, the kept tokens take new `positions` (default 0..k-1) and their
        keys are re-rotated; without, positions are kept."""
        pool = self.pool
        index = index.to("cpu")
        k = index.numel()
        old_positions = self.positions[index]
        new_positions, moved = old_positions, torch.empty(0, dtype=torch.long)
        if inv_freq is not None:  # planned on the host: which kept tokens move, and by how much
            new_positions = torch.arange(k) if positions is None else positions.to("cpu")
            moved = torch.nonzero(old_positions != new_positions).flatten()
        # Where the kept tokens are and go, and the moved ones' rows and shifts: to the device in one copy.
        planned = torch.cat([self.slots_of(index), self.slots(0, k), moved, (old_positions - new_positions)[moved]])
        source, target, rows, shift = upload(planned, pool.device).split([k, k, moved.numel(), moved.numel()])
        keys, values = pool.keys[:, source], pool.values[:, source]  # gathers copy, so overlap is safe
        if moved.numel():
            # [layers, tokens, heads, dim] -> shift_keys wants tokens second to last
            rotated = shift_keys(keys[:, rows].transpose(1, 2), shift, inv_freq)
            keys[:, rows] = rotated.transpose(1, 2)
        pool.keys[:, target], pool.values[:, target] = keys, values
        self.positions[:k] = new_positions
        self._shrink(k)

    def truncate(self, n: int) -> None:
        """Drop the tokens from index n on and return the blocks past them to the pool; nothing moves."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self._shrink(n)

    def _shrink(self, n: int) -> None:
        self.length = n
        keep_blocks = self.pool.blocks_for(n)
        self.pool._give_back(self.blocks[keep_blocks:])
        self.blocks = self.blocks[:keep_blocks]

    def close(self) -> None:
        """Return every block and the reservation to the pool (idempotent)."""
        if not self.closed:
            self.pool._close(self)
            self.blocks, self.length, self.closed = [], 0, True
