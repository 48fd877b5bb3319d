"""Rank-sharded example order: the resumable training sampler and the padded scoring shards. Pure python:
ranks arrive as plain ints."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping


class ResumableDistributedSampler:
    """Endless, resumable, rank-sharded stream of example indices (pure python).

    Epoch e: ``random.Random(seed + e)`` shuffles range(num_examples) (identity when shuffle=False), the order is
    extended by wrap-around to a multiple of world_size, and rank r takes positions r, r + world, ... so every
    rank has ``len(self)`` indices per epoch. ``epoch``/``position`` (indices already drawn by this rank in the
    epoch) are identical on all ranks when they all draw the same counts, so rank 0's state_dict suffices.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        epoch: int = 0,
        position: int = 0,
    ):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        _check_rank(rank, world_size)
        self.num_examples, self.rank, self.world_size = num_examples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self._cache: tuple[int, list[int]] | None = None
        self._set_position(epoch, position)

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.world_size)

    def _set_position(self, epoch: int, position: int) -> None:
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(
                f"need epoch >= 0 and 0 <= position <= {len(self)}, got epoch={epoch}, position={position}"
            )
        self.epoch, self.position = (epoch + 1, 0) if position == len(self) else (epoch, position)

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``."""
        self._set_position(epoch, 0)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, in order (length ``len(self)``)."""
        if self._cache is None or self._cache[0] != epoch:
            order = list(range(self.num_examples))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            total = len(self) * self.world_size
            padded = (order * math.ceil(total / self.num_examples))[:total]
            self._cache = (epoch, padded[self.rank :: self.world_size])
        return self._cache[1]

    def next_indices(self, k: int) -> list[int]:
        """Draw this rank's next ``k`` indices, crossing into the next epoch(s) as needed."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        out: list[int] = []
        while len(out) < k:
            take = min(k - len(out), len(self) - self.position)
            out += self.epoch_indices(self.epoch)[self.position : self.position + take]
            self._set_position(self.epoch, self.position + take)
        return out

    def __iter__(self) -> Iterator[int]:
        while True:
            yield self.next_indices(1)[0]

    def state_dict(self) -> dict[str, int]:
        keys = ("epoch", "position", "seed", "num_examples", "world_size")
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume exactly where ``state`` left off; the dataset size and world size must match."""
        for key, mine in (("num_examples", self.num_examples), ("world_size", self.world_size)):
            if state[key] != mine:
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has {key}={mine}; "
                    "resume with the same data and world size, or start the sampler fresh"
                )
        self.seed, self._cache = state["seed"], None
        self._set_position(state["epoch"], state["position"])


def shard_for_scoring(
    num_examples: int, rank: int, world_size: int, batch_size: int
) -> list[list[int | None]]:
    """This rank's scoring batches: example i goes to rank i % world_size; every rank gets the same number of
    batches of exactly ``batch_size`` entries, padded with None (placeholders scored as fully masked rows), so
    all ranks call a ZeRO-3 teacher the same number of times."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples}, {batch_size}")
    _check_rank(rank, world_size)
    num_batches = math.ceil(math.ceil(num_examples / world_size) / batch_size)
    mine: list[int | None] = list(range(rank, num_examples, world_size))
    mine += [None] * (num_batches * batch_size - len(mine))
    return [mine[b * batch_size : (b + 1) * batch_size] for b in range(num_batches)]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
        )
