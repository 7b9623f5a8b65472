"""Exact and near-duplicate removal. Rows are visited in order; a later row that duplicates an
earlier KEPT row is dropped, so the result does not depend on how duplicates chain.

Exact duplicates: equal canonical text (data_prep.text.canonical: LaTeX spellings such as
`\\dfrac`/`\\frac`, `\\overline{AE}`/`AE`, `\\neq`/`\\not=`, `$`, braces, punctuation, spacing
and case do not count).
Near-duplicates: token shingles (data_prep.text.match_tokens, `shingle_size` tokens each),
MinHash signatures (Broder 1997) bucketed by LSH bands; every bucket collision is then checked
with the exact Jaccard similarity of the two shingle sets, so the threshold is applied exactly
and LSH only decides which pairs are looked at. Cost is linear in the rows plus the colliding
pairs (benchmarks/bench_data_prep.py measures it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from data_prep.text import CANONICAL, TextForm, fold32, match_tokens, ngram_hashes

_MERSENNE = np.uint64((1 << 61) - 1)
_MINHASH_SEED = 20251011
"""Fixed seed of the MinHash permutations (part of the algorithm, not of the build's sampling)."""
_CHUNK_SHINGLES = 40_000
"""Shingles per vectorised MinHash chunk: [perms, chunk] uint64 stays ~40 MB at 128 perms."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DupMatch:
    id: str
    """The dropped row."""
    kept_id: str
    """The earlier kept row it duplicates."""
    similarity: float
    """Jaccard similarity of the shingle sets (1.0 for exact duplicates)."""


def exact_duplicates(
    rows: Sequence[dict[str, Any]], *, form: TextForm = CANONICAL
) -> tuple[list[bool], list[DupMatch]]:
    """keep [N] and matches: a row is dropped when its problem's key (canonical text by default;
    `form` exists so the build can count what the legacy key would have dropped) equals an
    earlier row's."""
    first: dict[str, str] = {}
    keep, matches = [], []
    for r in rows:
        key = form.key(r["problem"])
        if key in first:
            keep.append(False)
            matches.append(DupMatch(id=r["id"], kept_id=first[key], similarity=1.0))
        else:
            first[key] = r["id"]
            keep.append(True)
    return keep, matches


def shingles(text: str, k: int) -> np.ndarray:
    """uint32 [S] sorted unique shingle hashes; a text shorter than k tokens is one shingle."""
    toks = match_tokens(text)
    if not toks:  # only punctuation: the raw text is its one token
        toks = [text.strip()]
    h = ngram_hashes(toks, min(k, len(toks)))
    return np.unique(fold32(h))


@functools.lru_cache(maxsize=8)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the summed false-positive and
    false-negative areas of the LSH S-curve 1 - (1 - s^r)^b around the threshold (the criterion
    of datasketch's MinHashLSH._optimal_param, equal weights)."""
    s = np.linspace(0.0, 1.0, 401)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            fp = np.trapezoid(np.where(s < threshold, p, 0.0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1.0 - p, 0.0), s)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


def minhash_signatures(shingle_sets: Sequence[np.ndarray], num_perm: int) -> np.ndarray:
    """uint32 [N, num_perm]: h_i(x) = ((a_i * x + b_i) mod (2^61 - 1)), minimised over a row's
    shingles. a_i, b_i < 2^32 and x < 2^32, so a_i * x + b_i fits in uint64 without wrapping."""
    rng = np.random.default_rng(_MINHASH_SEED)
    a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)[:, None]
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)[:, None]
    out = np.empty((len(shingle_sets), num_perm), dtype=np.uint32)
    start = 0
    while start < len(shingle_sets):
        stop, total = start, 0
        while stop < len(shingle_sets) and (total == 0 or total + len(shingle_sets[stop]) <= _CHUNK_SHINGLES):
            total += len(shingle_sets[stop])
            stop += 1
        chunk = shingle_sets[start:stop]
        flat = np.concatenate(chunk).astype(np.uint64)
        offsets = np.cumsum([0] + [len(c) for c in chunk[:-1]])
        vals = (a * flat[None, :] + b) % _MERSENNE
        out[start:stop] = (np.minimum.reduceat(vals, offsets, axis=1) & np.uint64(0xFFFFFFFF)).T
        start = stop
    return out


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    inter = np.intersect1d(x, y, assume_unique=True).size
    return inter / (x.size + y.size - inter)


def near_duplicates(
    rows: Sequence[dict[str, Any]],
    *,
    threshold: float,
    shingle_size: int,
    num_perm: int,
    progress: bool = False,
) -> tuple[list[bool], list[DupMatch]]:
    """keep [N] and matches: a row is dropped when the Jaccard similarity of its problem's
    shingle set with an earlier kept row's is >= threshold (candidates from MinHash LSH)."""
    sets = [
        shingles(r["problem"], shingle_size) for r in tqdm(rows, desc="shingles", disable=not progress, leave=False)
    ]
    sigs = minhash_signatures(sets, num_perm) if sets else np.zeros((0, num_perm), np.uint32)
    bands, width = lsh_params(threshold, num_perm)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    keep, matches = [], []
    for i in tqdm(range(len(rows)), desc="near-dup", disable=not progress, leave=False):
        keys = [sigs[i, j * width : (j + 1) * width].tobytes() for j in range(bands)]
        best_j, best_sim, seen = -1, 0.0, set()
        for band, key in zip(buckets, keys):
            for j in band.get(key, ()):
                if j in seen:
                    continue
                seen.add(j)
                sim = _jaccard(sets[i], sets[j])
                if sim >= threshold and sim > best_sim:
                    best_j, best_sim = j, sim
        if best_j >= 0:
            keep.append(False)
            matches.append(DupMatch(id=rows[i]["id"], kept_id=rows[best_j]["id"], similarity=round(best_sim, 4)))
            continue
        keep.append(True)
        for band, key in zip(buckets, keys):
            band.setdefault(key, []).append(i)
    return keep, matches
