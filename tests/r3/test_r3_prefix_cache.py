"""Router mask cache (radix tree over token prefixes)."""

import pytest
import torch

from r3.prefix_cache import RouterMaskCache
from r3.trace import RoutingSpec

SPEC = RoutingSpec(num_layers=2, top_k=2, num_experts=8)


def _rows(tokens):
    """Deterministic fake routing: row t is a function of the prefix tokens[:t + 1]."""
    out = []
    for t in range(len(tokens)):
        h = sum((i + 1) * x for i, x in enumerate(tokens[: t + 1]))
        out.append([[h % 8, (h + 1) % 8], [(h + 3) % 8, (h + 5) % 8]])
    return torch.tensor(out)


def test_shared_prefix_and_group_sampling_hits():
    cache = RouterMaskCache(SPEC)
    system = [1, 2, 3, 4, 5]
    a = system + [10, 11, 12]
    cache.insert(a, _rows(a)[:-1])  # the last token was never fed: n - 1 rows
    b = system + [20, 21]
    got = cache.lookup(b)
    assert torch.equal(got, _rows(b)[:5])  # the system prompt's rows, no recompute
    cache.insert(b, _rows(b))  # splits the edge after the system prompt
    assert torch.equal(cache.lookup(a), _rows(a)[:-1])
    assert torch.equal(cache.lookup(b + [7]), _rows(b))
    assert cache.lookup([9, 9]).shape == (0, 2, 2)
    assert cache.num_rows == 7 + 2 and cache.stats["conflicts"] == 0


def test_multi_turn_reuses_the_whole_first_turn():
    cache = RouterMaskCache(SPEC)
    turn1 = [3, 4, 5, 6, 7, 8]
    cache.insert(turn1, _rows(turn1)[:-1])
    turn2 = turn1 + [30, 31, 32]
    # the first turn's last token was never fed, so 5 rows come back; the engine prefills from there
    assert torch.equal(cache.lookup(turn2), _rows(turn2)[:5])


def test_conflicts_counted_first_kept_and_clear():
    cache = RouterMaskCache(SPEC)
    s = [1, 2, 3]
    cache.insert(s, _rows(s))
    other = _rows(s).clone()
    other[1] = torch.tensor([[6, 7], [6, 7]])
    cache.insert(s, other)
    assert cache.stats["conflicts"] == 1 and torch.equal(cache.lookup(s), _rows(s))
    cache.clear()
    assert cache.lookup(s).shape[0] == 0 and cache.num_rows == 0


def test_lru_eviction_by_rows():
    cache = RouterMaskCache(SPEC, max_rows=6)
    a, b, c = [1, 2, 3], [4, 5, 6], [7, 8, 9]
    cache.insert(a, _rows(a))
    cache.insert(b, _rows(b))
    cache.lookup(a)  # a is now more recent than b
    cache.insert(c, _rows(c))
    assert cache.num_rows == 6 and cache.stats["evicted_rows"] == 3
    assert cache.lookup(b).shape[0] == 0 and cache.lookup(a).shape[0] == 3 and cache.lookup(c).shape[0] == 3


def test_bad_rows_rejected():
    with pytest.raises(ValueError, match="one row per fed token"):
        RouterMaskCache(SPEC).insert([1, 2, 3, 4], torch.zeros(2, 2, 2, dtype=torch.long))
