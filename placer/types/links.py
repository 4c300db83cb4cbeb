"""The cluster as a graph of ranks and links (networkx), and the bandwidth between any two ranks.

A preset cluster is ranks wired to switches: every GPU to its node's NVLink switch at the
NVLink bandwidth and, when there are several nodes, to the InfiniBand fabric at its NIC's
(``h100``, ``h200``: nodes of 8; ``gb200-nvl72``: 72 GPUs on one NVLink switch domain). A
cluster read from a file (``--topology FILE``) is its matrix: one link between every two ranks
at the measured GB/s. The bandwidth of a transfer is its path's: the widest path's bottleneck
(:func:`path_bandwidth`), which for a preset is NVLink inside a node and the NIC across nodes.

The dispatch model (DeepEP's: one send per remote NVLink domain, forwarded inside it) needs the
domains; a matrix's are found from its bandwidths (:func:`domains_of`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # networkx is imported where a graph is built (keeps it off placer --help)
    import networkx as nx

FABRIC = "fabric"
"""The InfiniBand fabric's vertex in a preset cluster's graph."""


def cluster_graph(num_nodes: int, gpus_per_node: int, nvlink_gbps: float, nic_gbps: float,
                  matrix: np.ndarray | None = None) -> nx.Graph:
    """Ranks ``0..G-1`` (attribute ``node``: the NVLink domain) and links (attribute ``gbps``).

    Without ``matrix``: switch vertices ``("nvswitch", n)`` per node (every rank of node ``n``
    linked at ``nvlink_gbps``) and, with several nodes, :data:`FABRIC` (every rank linked at
    ``nic_gbps``). With ``matrix`` float [G, G] GB/s: a link between every two ranks.
    """
    import networkx as nx  # deferred: see above

    g = nx.Graph()
    num_gpus = num_nodes * gpus_per_node
    for rank in range(num_gpus):
        g.add_node(rank, node=rank // gpus_per_node)
    if matrix is not None:
        i, j = np.triu_indices(num_gpus, 1)
        g.add_weighted_edges_from(zip(i.tolist(), j.tolist(), matrix[i, j].tolist(), strict=True), weight="gbps")
        return g
    for rank in range(num_gpus):
        g.add_edge(rank, ("nvswitch", rank // gpus_per_node), gbps=nvlink_gbps)
        if num_nodes > 1:
            g.add_edge(rank, FABRIC, gbps=nic_gbps)
    return g


def path_bandwidth(graph: nx.Graph, num_gpus: int) -> np.ndarray:
    """float [G, G] GB/s: between every two ranks, the bottleneck of the widest path (the path
    in a maximum spanning tree); the diagonal is ``inf`` (a rank's own data does not move)."""
    import networkx as nx  # deferred: see above

    tree = nx.maximum_spanning_tree(graph, weight="gbps")
    out = np.full((num_gpus, num_gpus), np.inf)
    for src in range(num_gpus):
        width = {src: np.inf}
        for parent, child in nx.bfs_edges(tree, src):
            width[child] = min(width[parent], tree.edges[parent, child]["gbps"])
        for dst in range(num_gpus):
            if dst != src:
                out[src, dst] = width[dst]
    return out


def two_level_matrix(num_nodes: int, gpus_per_node: int, nvlink_gbps: float, nic_gbps: float) -> np.ndarray:
    """float [G, G] GB/s of nodes of ``gpus_per_node`` GPUs: NVLink inside a node, the NIC
    across nodes, ``inf`` on the diagonal (what :func:`path_bandwidth` gives for the preset graph)."""
    node = np.arange(num_nodes * gpus_per_node) // gpus_per_node
    out = np.where(node[:, None] == node[None, :], float(nvlink_gbps), float(nic_gbps))
    np.fill_diagonal(out, np.inf)
    return out


def domains_of(matrix: np.ndarray) -> tuple[int, int] | str:
    """(num_nodes, gpus_per_node) of the NVLink domains in a bandwidth matrix float [G, G], or
    the reason there are none placer can use.

    The domains are the connected groups of the links faster than the matrix's widest gap: the
    off-diagonal bandwidths sorted, the largest ratio between two neighbours splits the fast
    links from the slow ones (a matrix of one bandwidth is one domain). placer's dispatch model
    needs them to be equal blocks of consecutive ranks (rank r in domain r // gpus_per_node).
    """
    num_gpus = matrix.shape[0]
    if num_gpus == 1:
        return 1, 1
    off = matrix[~np.eye(num_gpus, dtype=bool)]
    values = np.unique(off)
    if len(values) == 1:
        return 1, num_gpus
    ratios = values[1:] / values[:-1]
    cut = values[int(np.argmax(ratios)) + 1]  # the slowest fast link
    fast = matrix >= cut
    np.fill_diagonal(fast, True)
    # consecutive blocks: rank r's domain starts at the first rank it has a fast link to
    size = int(np.argmin(fast[0])) if not fast[0].all() else num_gpus
    if size == 0 or num_gpus % size:
        return (f"its fast links (>= {cut:g} GB/s) do not group the ranks into equal blocks of "
                f"consecutive ranks")
    node = np.arange(num_gpus) // size
    if not np.array_equal(fast, node[:, None] == node[None, :]):
        return (f"its fast links (>= {cut:g} GB/s) do not group the ranks into equal blocks of "
                f"consecutive ranks")
    return num_gpus // size, size


def tier_gbps(matrix: np.ndarray, gpus_per_node: int) -> tuple[float, float]:
    """(inside a domain, across domains) GB/s of a matrix: the harmonic means of its links' (so
    that a tier's mean seconds per byte is kept; the bandwidth itself when a tier is uniform).
    Across is the inside value when there is one domain."""
    num_gpus = matrix.shape[0]
    node = np.arange(num_gpus) // gpus_per_node
    same = node[:, None] == node[None, :]
    off = ~np.eye(num_gpus, dtype=bool)

    def harmonic(mask: np.ndarray) -> float:
        values = matrix[mask]
        return float(len(values) / np.sum(1.0 / values)) if len(values) else float("nan")

    inside = harmonic(same & off) if gpus_per_node > 1 else harmonic(off)
    across = harmonic(~same) if np.any(~same) else inside
    return inside, across
