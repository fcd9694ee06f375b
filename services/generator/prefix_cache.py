"""The keys and values of recent prompts, so that a prompt sharing a prefix with one of them prefills only
the tokens after it: longest-common-prefix lookup, a byte budget, least recently used out first. Pure numpy;
the runner that owns the cache layout copies the arrays in and out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


@dataclass
class CachedPrefix:
    tokens: tuple[int, ...]
    keys: list[np.ndarray]  # per layer [kv_heads, n, head_dim]
    values: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.keys, *self.values))


class _Node:
    """A token position in the trie of cached prompts."""

    __slots__ = ("children", "enders", "holders")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.holders: set[int] = set()  # entries whose prompt passes through here
        self.enders: set[int] = set()  # entries whose prompt ends here


class PrefixCache:
    def __init__(self, capacity_bytes: int, fresh_tokens: int = 1) -> None:
        """`fresh_tokens`: the fewest prompt tokens a prefill computes after a hit (at least one,
        whose logits pick the first new token)."""
        self.capacity_bytes = capacity_bytes
        self.fresh_tokens = max(1, fresh_tokens)
        self.nbytes = 0
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()
        # A trie, so that a lookup costs the prompt's length, not the number of entries.
        self._root = _Node()
        self._ids = count()

    def __len__(self) -> int:
        return len(self._entries)

    def _path(self, tokens: Sequence[int]) -> list[_Node]:
        """The trie nodes of the longest cached prefix of `tokens`, one per token."""
        path: list[_Node] = []
        node = self._root
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def longest_prefix(self, prompt: Sequence[int]) -> tuple[int, CachedPrefix | None]:
        """(how many leading tokens of `prompt` an entry holds, that entry); (0, None) on a miss."""
        path = self._path(prompt[: len(prompt) - self.fresh_tokens])
        if not path:
            return 0, None
        entry_id = next(iter(path[-1].holders))
        self._entries.move_to_end(entry_id)
        return len(path), self._entries[entry_id]

    def add(self, prompt: Sequence[int], keys: Sequence[np.ndarray], values: Sequence[np.ndarray]) -> None:
        """Keep a copy of the first len(prompt) positions of `keys` and `values`
        (per layer [kv_heads, >= len(prompt), head_dim])."""
        n = len(prompt)
        path = self._path(prompt)
        if len(path) == n and n:
            self._entries.move_to_end(next(iter(path[-1].holders)))  # held already
            return
        for node in path:
            # A prompt the new one continues (a conversation's earlier turn): the new one replaces it.
            for entry_id in list(node.enders):
                self._drop(entry_id)
        entry = CachedPrefix(
            tuple(int(t) for t in prompt),
            [k[:, :n].copy() for k in keys],
            [v[:, :n].copy() for v in values],
        )
        if entry.nbytes > self.capacity_bytes:
            return
        entry_id = next(self._ids)
        self._entries[entry_id] = entry
        self.nbytes += entry.nbytes
        node = self._root
        for token in prompt:
            node = node.children.setdefault(int(token), _Node())
            node.holders.add(entry_id)
        node.enders.add(entry_id)
        while self.nbytes > self.capacity_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.nbytes -= entry.nbytes
        node = self._root
        for token in entry.tokens:
            child = node.children[token]
            child.holders.discard(entry_id)
            if not child.holders:
                del node.children[token]  # no other entry goes this way
                return
            node = child
        node.enders.discard(entry_id)
