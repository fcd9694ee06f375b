"""The prefix cache's bookkeeping over small arrays: the longest shared prefix, the last prompt
token left to compute, LRU eviction within the byte budget, and a turn replacing the one it
continues."""

from __future__ import annotations

import numpy as np

from services.generator.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 2, 3, 4


def kv(tokens: int, fill: float = 1.0) -> list[np.ndarray]:
    return [np.full((HEADS, tokens, DIM), fill, np.float32) for _ in range(LAYERS)]


def token_bytes(tokens: int) -> int:
    return 2 * LAYERS * HEADS * tokens * DIM * 4


def test_a_lookup_returns_the_entry_with_the_longest_common_prefix() -> None:
    cache = PrefixCache(token_bytes(100))
    cache.add([1, 2, 3, 4], kv(4, 1.0), kv(4, 1.0))
    cache.add([1, 2, 7, 8, 9], kv(5, 2.0), kv(5, 2.0))
    shared, entry = cache.longest_prefix([1, 2, 7, 8, 5, 6])
    assert shared == 4 and entry is not None and float(entry.keys[0][0, 0, 0]) == 2.0
    assert cache.longest_prefix([9, 9, 9]) == (0, None)


def test_a_hit_leaves_the_last_prompt_token_to_compute() -> None:
    cache = PrefixCache(token_bytes(100))
    cache.add([1, 2, 3, 4], kv(4), kv(4))
    assert cache.longest_prefix([1, 2, 3, 4])[0] == 3
    assert cache.longest_prefix([1, 2, 3, 4, 5])[0] == 4
    two_fresh = PrefixCache(token_bytes(100), fresh_tokens=2)
    two_fresh.add([1, 2, 3, 4], kv(4), kv(4))
    assert two_fresh.longest_prefix([1, 2, 3, 4])[0] == 2


def test_the_least_recently_used_prompt_leaves_when_the_budget_is_full() -> None:
    cache = PrefixCache(token_bytes(10))
    cache.add([1, 1, 1, 1], kv(4), kv(4))
    cache.add([2, 2, 2, 2], kv(4), kv(4))
    cache.longest_prefix([1, 1, 1, 1, 5])  # the first one is now the most recently used
    cache.add([3, 3, 3, 3], kv(4), kv(4))
    assert cache.nbytes <= token_bytes(10) and len(cache) == 2
    assert cache.longest_prefix([2, 2, 2, 2, 5]) == (0, None)
    assert cache.longest_prefix([1, 1, 1, 1, 5])[0] == 4
    cache.add(list(range(11)), kv(11), kv(11))  # larger than the whole budget: not kept
    assert len(cache) == 2 and cache.longest_prefix(list(range(11)))[0] == 0


def test_an_evicted_prompt_leaves_the_prefix_it_shares_with_a_kept_one() -> None:
    cache = PrefixCache(token_bytes(8))
    cache.add([1, 2, 3, 4], kv(4, 1.0), kv(4, 1.0))
    cache.add([1, 2, 5, 6], kv(4, 2.0), kv(4, 2.0))
    cache.add([1, 2, 5, 7], kv(4, 3.0), kv(4, 3.0))  # evicts [1, 2, 3, 4]
    shared, entry = cache.longest_prefix([1, 2, 3, 4, 9])
    assert shared == 2 and entry is not None and float(entry.keys[0][0, 0, 0]) in (2.0, 3.0)
    assert cache.longest_prefix([1, 2, 5, 6, 9])[0] == 4


def test_a_conversation_turn_replaces_the_turn_it_continues() -> None:
    cache = PrefixCache(token_bytes(100))
    cache.add([1, 2, 3], kv(3), kv(3))
    cache.add([1, 2, 3, 4, 5], kv(5), kv(5))
    assert len(cache) == 1 and cache.nbytes == token_bytes(5)
    cache.add([1, 2, 3, 4], kv(5), kv(5))  # already held by the longer entry
    assert len(cache) == 1
