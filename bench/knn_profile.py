"""Where the exact kNN search's time goes, on one thread: the product alone, the product with the pass of
group maxima, the whole search, and a bfloat16 prefilter that was tried and not kept, in one process.

    python bench/knn_profile.py [--n 307200] [--queries 2048] [--d 128] [--k 21] [--seed 0]

Data: ``bench/kmeans.py``'s seeded Gaussian classes, L2-normalised (untimed); ``--queries`` seeded bank
rows searched against the whole bank, one query block as :class:`~sslkit.evaluate.search.TopK`
adds it, bank block by bank block (1,024 rows). Timed, each the best of two runs:

- **product**: ``torch.mm`` of the query block with every bank block, into one scratch tile;
- **product + maxima**: the same, and the ``torch.amax`` of every group of 64 similarities per query
  (what ``TopK`` compares with each query's threshold);
- **search**: ``TopK`` itself (maxima, candidates above threshold, merges);
- **bf16 prefilter**: the product in bfloat16 (AMX where the CPU has it), its maxima read as int16
  (the bit patterns of non-negative bfloat16 values order as the values do), every similarity within
  2^-6 of the norms below a query's threshold recomputed in float32. It finds the same neighbours;
  it is printed to show why it was not adopted.

Also the product alone in bfloat16 (its inputs converted beforehand), and the product and product
+ maxima at other tile shapes (queries x bank rows). Prints each time
and its rate in float32 GFLOP/s (2 * queries * N * D flops over the time), then ``ratio=<product time
/ search time>``: the share of the float32 matmul rate the search keeps.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from kmeans import clustered_embeddings, machine  # bench/ is on sys.path as a script

from sslkit.evaluate import as_features
from sslkit.evaluate.search import GROUP, Scratch, TopK

BANK_BLOCK = 1024


class Bf16Prefilter(TopK):
    """TopK whose tiles are multiplied in bfloat16; candidates are confirmed in float32 (module notes)."""

    def __init__(self, queries: torch.Tensor, k: int) -> None:
        super().__init__(queries, k)
        self.q16, self.qnorm = queries.bfloat16(), queries.norm(dim=1)
        self.tile = torch.empty(queries.shape[0], BANK_BLOCK, dtype=torch.bfloat16)
        self.pairs = 0

    def add(self, block: torch.Tensor, ids: torch.Tensor) -> None:
        low = self.threshold - 2.0**-6 * self.qnorm * float(block.norm(dim=1).max())
        if self.seen < self.k or float(low.min()) < 0 or block.shape[0] != BANK_BLOCK:
            return super().add(block, ids)
        rounded = low.bfloat16()  # rounded down, as int16: a value passes only if it may exceed ``low``
        bound = rounded.view(torch.int16) - (rounded.float() > low).to(torch.int16)
        tile = torch.mm(self.q16, block.bfloat16().T, out=self.tile).view(torch.int16).unflatten(1, (-1, GROUP))
        query, group = torch.nonzero(torch.amax(tile, dim=2) > bound[:, None], as_tuple=True)
        hit, col = torch.nonzero(tile[query, group] > bound[query][:, None], as_tuple=True)
        query, rows = query[hit], group[hit] * GROUP + col
        self.pairs += query.numel()
        exact = (self.queries[query] * block[rows]).sum(1)
        keep = exact > self.threshold[query]
        self._keep(query[keep], ids[rows[keep]], exact[keep])
        self.seen += block.shape[0]


def best_of_two(fn) -> tuple[float, object]:
    times, out = [], None
    for _ in range(2):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def products(queries: torch.Tensor, bank: torch.Tensor, *, rows: int, cols: int, maxima: bool) -> None:
    scratch = Scratch()
    for start in range(0, bank.shape[0], cols):
        block = bank[start:start + cols]
        for q in range(0, queries.shape[0], rows):
            tile = scratch.tile(min(rows, queries.shape[0] - q), block.shape[0])
            torch.mm(queries[q:q + rows], block.T, out=tile)
            if maxima:
                torch.amax(tile[:, : tile.shape[1] // GROUP * GROUP].unflatten(1, (-1, GROUP)), dim=2)


def search(cls, queries: torch.Tensor, bank: torch.Tensor, k: int) -> TopK:
    top = cls(queries, k)
    for start in range(0, bank.shape[0], BANK_BLOCK):
        top.add(bank[start:start + BANK_BLOCK], torch.arange(start, min(start + BANK_BLOCK, bank.shape[0])))
    top.result()
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=307_200, help="bank rows")
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=21, help="neighbours (knn_eval's k 20 + the query itself)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, _ = clustered_embeddings(args.n, args.d, 32, seed=args.seed)
    bank = torch.from_numpy(as_features(x, normalize=True))
    rows = np.sort(np.random.default_rng(args.seed + 1).choice(args.n, size=args.queries, replace=False))
    queries = bank[torch.from_numpy(rows)].contiguous()
    print(f"{args.queries:,} queries x {args.n:,} bank rows x {args.d}, k {args.k}, 1 thread; {machine()}")
    rate = lambda s: 2 * args.queries * args.n * args.d / s / 1e9  # noqa: E731
    show = lambda label, s: print(f"{label:<44}{s:7.2f} s  {rate(s):6.1f} GFLOP/s")  # noqa: E731
    product, _ = best_of_two(lambda: products(queries, bank, rows=2048, cols=BANK_BLOCK, maxima=False))
    show("product (2048 x 1024 tiles)", product)
    q16, bank16 = queries.bfloat16(), bank.bfloat16()
    tile16 = torch.empty(args.queries, BANK_BLOCK, dtype=torch.bfloat16)
    show("product in bfloat16 (2048 x 1024 tiles)", best_of_two(lambda: [
        torch.mm(q16, bank16[start:start + BANK_BLOCK].T, out=tile16) for start in range(0, args.n, BANK_BLOCK)])[0])
    show("product + group maxima", best_of_two(lambda: products(queries, bank, rows=2048, cols=BANK_BLOCK,
                                                                maxima=True))[0])
    whole, exact = best_of_two(lambda: search(TopK, queries, bank, args.k))
    show("search (TopK)", whole)
    seconds, pre = best_of_two(lambda: search(Bf16Prefilter, queries, bank, args.k))
    same = float(np.mean(np.sort(pre.ids.numpy(), 1) == np.sort(exact.ids.numpy(), 1)))
    show(f"bf16 prefilter ({pre.pairs:,} pairs recomputed)", seconds)
    print(f"  the same neighbours as the search in {100 * same:.3f} % of places")
    for shape in ((512, 512), (256, 1024), (1024, 256)):
        for maxima in (False, True):
            show(f"{'product + maxima' if maxima else 'product'} ({shape[0]} x {shape[1]} tiles)", best_of_two(
                lambda shape=shape, maxima=maxima: products(queries, bank, rows=shape[0], cols=shape[1],
                                                            maxima=maxima))[0])
    print(f"ratio={product / whole:.2f}")


if __name__ == "__main__":
    main()
