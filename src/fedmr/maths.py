"""Pure tensor maths shared by every algorithm: pools, recombination, averaging, similarity.

A *state* is a model's ``state_dict`` (key -> tensor).  A *pool* is K states
stacked along a new leading dimension (key -> tensor of shape ``(K, *shape)``),
so recombination is one indexing per key and averaging one reduction per key,
with no per-model Python loop and no deep copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

State = dict[str, torch.Tensor]
Pool = dict[str, torch.Tensor]


def stack_states(states: Sequence[Mapping[str, torch.Tensor]]) -> Pool:
    """Stack K states key by key into a pool (keys in the first state's order)."""
    if not states:
        raise ValueError("cannot stack an empty list of states")
    return {key: torch.stack([s[key].detach() for s in states]).contiguous() for key in states[0]}


def replicate(state: Mapping[str, torch.Tensor], k: int) -> Pool:
    """A pool of k identical copies of one state."""
    return {key: value.detach().unsqueeze(0).repeat(k, *([1] * value.dim())).contiguous() for key, value in state.items()}


def slot(pool: Pool, index: int) -> State:
    """One model of the pool, as views (no copy)."""
    return {key: value[index] for key, value in pool.items()}


def key_blocks(keys: Sequence[str], block_fraction: float | None) -> list[list[str]]:
    """Cut the ordered keys into contiguous blocks that move as units.

    ``None`` (default FedMR) gives one block per key; ``block_fraction = p``
    gives blocks of ``max(1, round(p * L))`` keys, so p = 1 moves whole models.
    """
    keys = list(keys)
    if block_fraction is None:
        return [[key] for key in keys]
    if not 0 < block_fraction <= 1:
        raise ValueError(f"block_fraction must be in (0, 1], got {block_fraction}")
    size = max(1, round(block_fraction * len(keys)))
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def draw_permutations(
    keys: Sequence[str], k: int, generator: torch.Generator, block_fraction: float | None = None
) -> dict[str, torch.Tensor]:
    """One independent uniform permutation of 0..k-1 per block, given per key."""
    perms: dict[str, torch.Tensor] = {}
    for block in key_blocks(keys, block_fraction):
        perm = torch.randperm(k, generator=generator)
        for key in block:
            perms[key] = perm
    return perms


def resize_pool(pool: Pool, k: int) -> Pool:
    """The pool with k models: its first k, or all of them and copies of their mean up to k.

    Used where K follows the nodes a round reaches (Flower's FedMR strategy): after a
    recombination the slots are exchangeable, so which ones go does not matter, and a new slot
    starts from the model the federation agrees on, the pool mean."""
    n = next(iter(pool.values())).shape[0]
    if k < 1:
        raise ValueError(f"a pool needs at least one model, got k={k}")
    if k <= n:
        return {key: value[:k].clone() for key, value in pool.items()}
    extra = replicate(pool_mean(pool), k - n)
    return {key: torch.cat([value, extra[key]]) for key, value in pool.items()}


def recombine(pool: Pool, permutations: Mapping[str, torch.Tensor]) -> Pool:
    """New pool with ``new[key][i] = pool[key][perm[key][i]]``; the input is not modified."""
    return {key: value[permutations[key].to(value.device)] for key, value in pool.items()}


def recombine_(pool: Pool, permutations: Mapping[str, torch.Tensor]) -> Pool:
    """In-place recombination, ``pool[key][i] <- pool[key][perm[i]]``, following each cycle of the
    permutation with one slot's entry as the only buffer: the server never holds a second pool,
    not even of its largest entry (half of VGG-16 sits in one key)."""
    for key, value in pool.items():
        perm = [int(p) for p in permutations[key]]
        seen = [False] * len(perm)
        for start in range(len(perm)):
            if seen[start] or perm[start] == start:
                seen[start] = True
                continue
            buffer = value[start].clone()
            i = start
            while True:
                seen[i] = True
                source = perm[i]
                if source == start:
                    value[i].copy_(buffer)
                    break
                value[i].copy_(value[source])
                i = source
    return pool


def _mean_as(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0 in float, cast back to the entry's dtype (integer buffers truncate)."""
    work = values if values.is_floating_point() else values.double()
    if weights is None:
        mean = work.mean(dim=0)
    else:
        w = weights.to(device=work.device, dtype=work.dtype).reshape(-1, *([1] * (work.dim() - 1)))
        mean = (work * w).sum(dim=0)
    return mean.to(values.dtype)


def pool_mean(pool: Pool) -> State:
    """Unweighted element-wise mean of the pool over every entry, buffers included."""
    return {key: _mean_as(value, None) for key, value in pool.items()}


def weighted_mean(pool: Pool, weights: Sequence[float] | torch.Tensor) -> State:
    """Element-wise mean weighted by ``weights`` (normalised here, e.g. client sample counts)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.dim() != 1 or w.numel() != next(iter(pool.values())).shape[0]:
        raise ValueError("need one weight per pool member")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = w / w.sum()
    return {key: _mean_as(value, w) for key, value in pool.items()}


def mean_pairwise_cosine(pool: Pool, chunk_numel: int = 1 << 20) -> float:
    """Mean cosine similarity over all pairs of pool models, each flattened over its float entries.

    The Gram matrix is accumulated key by key (in chunks), so no model is ever
    flattened whole; this is the pool-diversity statistic of the authors' code.
    """
    gram: torch.Tensor | None = None
    for value in pool.values():
        if not value.is_floating_point():
            continue
        flat = value.reshape(value.shape[0], -1)
        for start in range(0, flat.shape[1], chunk_numel):
            part = flat[:, start : start + chunk_numel].double()
            g = part @ part.T
            gram = g if gram is None else gram + g
    if gram is None or gram.shape[0] < 2:
        return 1.0
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    cos = gram / (norms[:, None] * norms[None, :])
    k = gram.shape[0]
    return float((cos.sum() - cos.diagonal().sum()) / (k * (k - 1)))


def state_numel(state: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def tensors_nbytes(value: object) -> int:
    """Bytes of every tensor in ``value``: a tensor, or dicts, lists and tuples of them (anything
    else, numbers and strings, counts 0): what a model state or a payload puts on the wire."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensors_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensors_nbytes(v) for v in value)
    return 0



class RunningMean:
    """Weighted mean of states folded in one at a time: memory of one state, not K."""

    def __init__(self) -> None:
        self._sum: State = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight < 0:
            raise ValueError("weights must be non-negative")
        for key, value in state.items():
            work = value.detach().double() if not value.is_floating_point() else value.detach()
            if key in self._sum:
                self._sum[key].add_(work, alpha=weight)
            else:
                self._dtypes[key] = value.dtype
                self._sum[key] = work.mul(weight)
        self.total_weight += weight

    def result(self) -> State:
        if self.total_weight <= 0:
            raise ValueError("no weight was added")
        return {k: (v / self.total_weight).to(self._dtypes[k]) for k, v in self._sum.items()}
