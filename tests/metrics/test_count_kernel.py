"""The compiled count kernel (``metrics._count``) counts exactly what the numpy reference of
``metrics.core`` counts, under every dispatch rule, on seeded random placements with replicas
(small and large clusters, one and several GPUs per node), int16 and int64 ids, any token positions."""

from __future__ import annotations

import numpy as np
import pytest

from placer.metrics import core
from placer.metrics._count import dispatch_arrays
from placer.types import DISPATCH_RULES, Placement, Topology

SHAPES = [  # (num_gpus, gpus_per_node, slots_per_gpu, layers, experts, top_k)
    (4, 2, 2, 3, 6, 2),
    (8, 8, 3, 2, 16, 4),
    (16, 4, 1, 3, 16, 1),
    (6, 3, 2, 1, 7, 3),
    (96, 8, 2, 2, 150, 6),  # more than 64 GPUs: the reference's sorted path
]


def random_placement(rng: np.random.Generator, num_gpus: int, spg: int, layers: int, experts: int) -> Placement:
    """Every expert placed at least once, the remaining slots random replicas, slots shuffled."""
    p = num_gpus * spg
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, p - experts)]))
                    for _ in range(layers)])
    return Placement(p2l, spg, experts)


def reference_counts(placement, topology, ids, home, index, rule, table, coherent):
    """What ``core.accumulate`` summed with the numpy count functions (the path before the kernel)."""
    gpu = core.chunk_gpus(placement, topology, ids, home, index, rule, 42, table)
    layers, gpus = placement.num_layers, placement.num_gpus
    load = np.bincount((np.arange(layers)[None, :, None] * gpus + gpu).ravel(), minlength=layers * gpus)
    out = {"gpu_load": load, **core.standard_counts(gpu, home, topology.gpus_per_node, topology.num_gpus),
           "pair_sends": reference_pair_sends(gpu, home, topology.gpus_per_node, topology.num_gpus)}
    if coherent:
        out.update(core.cc_counts(placement, topology, ids, home, index, rule, 42, table))
    return out


def reference_pair_sends(gpu, home, gpn, num_gpus):
    """DeepEP's sends by hand, token by token: home to each other destination in its node, one
    send to home's lane in each remote node with a destination, forwarded from there to the rest."""
    pairs = np.zeros((gpu.shape[1], num_gpus, num_gpus), dtype=np.int64)
    for i in range(gpu.shape[0]):
        h = int(home[i])
        for layer in range(gpu.shape[1]):
            dests = {int(g) for g in gpu[i, layer]} - {h}
            for node in {g // gpn for g in dests}:
                if node == h // gpn:
                    for g in dests:
                        if g // gpn == node:
                            pairs[layer, h, g] += 1
                    continue
                land = node * gpn + h % gpn
                pairs[layer, h, land] += 1
                for g in dests:
                    if g // gpn == node and g != land:
                        pairs[layer, land, g] += 1
    return pairs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", DISPATCH_RULES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_counts_equal_numpy_reference(shape, rule, seed):
    num_gpus, gpn, spg, layers, experts, k = shape
    rng = np.random.default_rng(seed)
    topology = Topology("t", num_gpus // gpn, gpn)
    placement = random_placement(rng, num_gpus, spg, layers, experts)
    t = 300
    ids = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(t)])
    home = rng.integers(0, num_gpus, t).astype(np.int64)
    index = np.sort(rng.choice(10**7, t, replace=False)).astype(np.int64)  # positions far from 0 (vllm's hash)
    table = core.rank_table(placement, topology, rule, 42)
    arrays = [dispatch_arrays(placement, gpn, table)]
    for dtype in (np.int16, np.int64):
        for coherent in (False, True):
            tokens = core.Tokens(ids.astype(dtype), home, index, "trace")
            got = core.count_tokens(tokens, arrays, rule, coherent, layers, pairs=True)[0]
            want = reference_counts(placement, topology, ids.astype(np.int64), home, index, rule, table, coherent)
            assert set(got) == set(want)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{rule} {name} {dtype.__name__}")
            without = core.count_tokens(tokens, arrays, rule, coherent, layers)[0]  # pairs not counted
            assert set(without) == set(want) - {"pair_sends"}
            for name in without:
                np.testing.assert_array_equal(without[name], want[name])


@pytest.mark.parametrize("rule", DISPATCH_RULES)
def test_several_placements_in_one_pass_equal_each_alone(rule):
    """Counts of several placements from one pass equal each placement counted on its own,
    over many chunks (the sums across chunks included)."""
    rng = np.random.default_rng(7)
    topology = Topology("t", 4, 4)
    placements = [random_placement(rng, 16, 2, 3, 20) for _ in range(3)]
    t = 2000
    ids = np.stack([np.stack([rng.choice(20, 4, replace=False) for _ in range(3)]) for _ in range(t)])
    tokens = core.Tokens(ids, rng.integers(0, 16, t).astype(np.int64), np.arange(t, dtype=np.int64), "trace")
    small = core.Tokens(*(a for a in (tokens.ids, tokens.home, tokens.index)), "trace")
    arrays = [dispatch_arrays(p, 4, core.rank_table(p, topology, rule, 42)) for p in placements]
    together = core.count_tokens(tokens, arrays, rule, True, 3)
    for a, got in zip(arrays, together, strict=True):
        alone = core.count_tokens(small, [a], rule, True, 3)[0]
        for name in alone:
            np.testing.assert_array_equal(got[name], alone[name])
    # many chunks sum to the one chunk's counts
    chunked = core.count_tokens(_Chunked(tokens, 37), arrays, rule, True, 3)
    for got, want in zip(chunked, together, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


class _Chunked:
    """``tokens`` yielded in pieces of ``step`` tokens."""

    def __init__(self, tokens: core.Tokens, step: int):
        self.tokens, self.step = tokens, step

    def chunks(self):
        for lo in range(0, self.tokens.num_tokens, self.step):
            sl = slice(lo, lo + self.step)
            yield self.tokens.ids[sl], self.tokens.home[sl], self.tokens.index[sl]


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_counts_split_across_threads_equal_one_thread(monkeypatch, threads):
    """Pieces of the stream counted by ``threads`` threads at once sum to the one-thread
    counts, every placement, a rank rule and a position rule."""
    rng = np.random.default_rng(11)
    topology = Topology("t", 4, 4)
    placements = [random_placement(rng, 16, 2, 3, 20) for _ in range(2)]
    t = 1001
    ids = np.stack([np.stack([rng.choice(20, 4, replace=False) for _ in range(3)]) for _ in range(t)])
    tokens = _Chunked(core.Tokens(ids, rng.integers(0, 16, t).astype(np.int64), np.arange(t, dtype=np.int64),
                                  "trace"), 97)
    for rule in ("nearest", "vllm"):
        arrays = [dispatch_arrays(p, 4, core.rank_table(p, topology, rule, 42)) for p in placements]
        monkeypatch.setattr(core, "count_threads", lambda: 1)
        want = core.count_tokens(tokens, arrays, rule, True, 3, pairs=True)
        monkeypatch.setattr(core, "count_threads", lambda: threads)
        got = core.count_tokens(tokens, arrays, rule, True, 3, pairs=True)
        for g, w in zip(got, want, strict=True):
            assert set(g) == set(w)
            for name in w:
                np.testing.assert_array_equal(g[name], w[name], err_msg=f"{rule} {name} threads={threads}")
