"""Near-duplicate grouping: imgclf's vectorised grouping against a pair-by-pair loop over imagehash hashes.

Random 256-bit dhashes (``hash_size`` 16) with planted near-duplicates (1 to ``--max-distance`` bits
flipped) and one exact copy. The baseline compares every pair with imagehash's own Hamming distance
(``ImageHash.__sub__``) and joins pairs within ``--max-distance``, as one would write it with the library
alone; being quadratic in Python, it runs on ``--baseline-n`` hashes, and imgclf's ``group_duplicates`` on
the same hashes (both must find the same groups), then on each ``--n``, at ``--max-distance`` and at 0
(a hash lookup). Prints the median of ``--repeats`` runs of each and imgclf's time as a share of the baseline's.

    python bench/bench_dedup.py [--n 10000 50000] [--baseline-n 1000] [--max-distance 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import imagehash
import numpy as np

from imgclf.cli import positive_int
from imgclf.datatools.dedup import HashInfo, group_duplicates


def planted_hashes(n: int, max_distance: int, seed: int = 0) -> np.ndarray:
    """(n, 256) bool: random hashes; the last tenth copies the first ones, the last hash exactly (a copy of
    hash 0), the others with 1..max_distance bits flipped."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, (n, 256), dtype=np.uint8).astype(bool)
    for k in range(n // 10):
        bits[n - 1 - k] = bits[k]
        if k:
            bits[n - 1 - k, rng.choice(256, 1 + k % max_distance, replace=False)] ^= True
    return bits


def baseline_groups(bits: np.ndarray, max_distance: int) -> list[list[int]]:
    """Groups (size >= 2, sorted) by comparing every pair's imagehash distance, joined by union-find."""
    hashes = [imagehash.ImageHash(b.reshape(16, 16)) for b in bits]
    parent = list(range(len(hashes)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            if hashes[i] - hashes[j] <= max_distance:
                parent[find(i)] = find(j)
    members: dict[int, list[int]] = {}
    for i in range(len(hashes)):
        members.setdefault(find(i), []).append(i)
    return sorted(g for g in members.values() if len(g) > 1)


def imgclf_groups(bits: np.ndarray, max_distance: int) -> list[list[int]]:
    infos = [HashInfo(np.packbits(b).tobytes(), 10, 10) for b in bits]
    names = [f"{i:07d}" for i in range(len(bits))]
    return sorted(sorted(int(m.path) for m in g) for g in group_duplicates(names, infos, max_distance))


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000], help="Hash counts for imgclf alone.")
    ap.add_argument("--baseline-n", type=int, default=1_000, help="Hash count of the pair-by-pair comparison.")
    ap.add_argument("--max-distance", type=int, default=4)
    ap.add_argument("--repeats", type=positive_int, default=3)
    args = ap.parse_args()
    if args.max_distance < 1:
        ap.error("--max-distance must be at least 1 (0 is always timed too)")
    if min(*args.n, args.baseline_n) < 10:
        ap.error("--n and --baseline-n must be at least 10 (the last tenth of the hashes are the planted copies)")
    d, r = args.max_distance, args.repeats
    bits = planted_hashes(args.baseline_n, d)
    t_base, expected = median_time(lambda: baseline_groups(bits, d), r)
    t_ours, got = median_time(lambda: imgclf_groups(bits, d), r)
    if got != expected:
        raise SystemExit(f"imgclf found other groups than the pair-by-pair comparison ({len(got)} vs {len(expected)})")
    print(f"{args.baseline_n} hashes, max_distance {d}: {len(got)} groups found by both (medians of {r} runs)")
    print(f"  imagehash pair by pair: {t_base:8.3f} s")
    print(f"  imgclf:                 {t_ours:8.3f} s = {t_ours / t_base:.4f} of the baseline")
    for n in args.n:
        many = planted_hashes(n, d)
        t_near, _ = median_time(lambda many=many: imgclf_groups(many, d), r)
        t_exact, exact = median_time(lambda many=many: imgclf_groups(many, 0), r)
        if exact != [[0, n - 1]]:
            raise SystemExit(f"max_distance 0 on {n} hashes found {exact[:3]}, not the one exact copy [0, {n - 1}]")
        print(
            f"imgclf, {n} hashes: max_distance {d} {t_near:.3f} s; max_distance 0 {t_exact:.3f} s (the exact copy found)"
        )


if __name__ == "__main__":
    main()
