"""Router mask cache: routing rows stored per token prefix in a radix tree (PAPER.md "The method").

The routing row of fed token t depends only on tokens[:t + 1] (causal attention), so it can be
cached with the prefix, as the paper caches masks beside the prefix KV cache: a repeated prefix
(multi-turn, a shared system prompt, the G samples of one prompt) returns its masks without
recompute. Edges are compressed token runs (like SGLang's RadixCache); each edge holds the rows
[len(edge), L, K] of its tokens. Capacity is in cached rows; least-recently-used leaves go first.

Validity: cached rows are only valid for the weights they were computed with; call `clear()` on
every weight sync. If a re-inserted prefix's rows differ from the cached ones (batch-dependent
numerics at near-ties), the first ones are kept and `stats["conflicts"]` counts the rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from r3.trace import RoutingSpec


class _Node:
    __slots__ = ("key", "rows", "children", "parent", "last_access")

    def __init__(self, key: tuple[int, ...], rows: torch.Tensor | None, parent: "_Node | None"):
        self.key = key
        self.rows = rows  # [len(key), L, K]
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.last_access = 0


class RouterMaskCache:
    """Radix tree from token prefixes to their routing rows."""

    def __init__(self, spec: RoutingSpec, *, max_rows: int | None = None):
        self.spec = spec
        self.max_rows = max_rows
        self._root = _Node((), None, None)
        self._clock = itertools.count(1)
        self.num_rows = 0
        self.stats = {"lookups": 0, "hit_rows": 0, "inserted_rows": 0, "conflicts": 0, "evicted_rows": 0}

    def clear(self) -> None:
        """Drop everything (call after a weight sync: routing depends on the weights)."""
        self._root = _Node((), None, None)
        self.num_rows = 0

    def insert(self, token_ids: Sequence[int], expert_ids_TLK: torch.Tensor) -> None:
        """Cache the rows of a sequence. Rows are per fed token: len(rows) == len(tokens), or
        len(tokens) - 1 when the last token was never fed (it is then not cached)."""
        tokens = tuple(int(t) for t in token_ids)
        rows = torch.as_tensor(expert_ids_TLK)
        L, K = self.spec.num_layers, self.spec.top_k
        if rows.ndim != 3 or rows.shape[1:] != (L, K) or rows.shape[0] not in (len(tokens), len(tokens) - 1):
            raise ValueError(
                f"insert: rows {tuple(rows.shape)} must be [n or n-1, {L}, {K}] for n={len(tokens)} tokens "
                "(one row per fed token)"
            )
        tokens = tokens[: rows.shape[0]]
        node, i, now = self._root, 0, next(self._clock)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                new = _Node(tokens[i:], rows[i:].clone(), node)
                new.last_access = now
                node.children[tokens[i]] = new
                self.num_rows += len(new.key)
                self.stats["inserted_rows"] += len(new.key)
                break
            common = _common_prefix(child.key, tokens[i:])
            if common < len(child.key):
                child = self._split(child, common)
            differ = (child.rows != rows[i : i + common]).flatten(1).any(dim=1)
            self.stats["conflicts"] += int(differ.sum())
            child.last_access = now
            node, i = child, i + common
        self._evict()

    def lookup(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Rows of the longest cached prefix of token_ids: [m, L, K], m >= 0."""
        tokens = tuple(int(t) for t in token_ids)
        parts, node, i, now = [], self._root, 0, next(self._clock)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            common = _common_prefix(child.key, tokens[i:])
            parts.append(child.rows[:common])
            child.last_access = now
            if common < len(child.key):
                break
            node, i = child, i + common
        self.stats["lookups"] += 1
        if not parts:
            return torch.empty(0, self.spec.num_layers, self.spec.top_k, dtype=torch.int64)
        out = torch.cat(parts)
        self.stats["hit_rows"] += out.shape[0]
        return out

    def _split(self, child: _Node, at: int) -> _Node:
        """Split child's edge at `at`: returns the new upper node holding key[:at]."""
        parent = child.parent
        upper = _Node(child.key[:at], child.rows[:at], parent)
        upper.last_access = child.last_access
        parent.children[child.key[0]] = upper
        child.key, child.rows, child.parent = child.key[at:], child.rows[at:], upper
        upper.children[child.key[0]] = child
        return upper

    def _evict(self) -> None:
        if self.max_rows is None:
            return
        while self.num_rows > self.max_rows:
            leaves = [n for n in self._iter_nodes() if not n.children and n is not self._root]
            victim = min(leaves, key=lambda n: n.last_access)
            del victim.parent.children[victim.key[0]]
            self.num_rows -= len(victim.key)
            self.stats["evicted_rows"] += len(victim.key)

    def _iter_nodes(self):
        stack = [self._root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
