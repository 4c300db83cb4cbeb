"""All-to-all kernels, registered by name: how each kernel family puts tokens on the links.

A kernel says, for one step's :class:`~placer.simulator.routing.Traffic`, how many tokens cross
each (src, dst) pair over NVLink and over RDMA in the dispatch direction (combine is the
reverse), which of the NVLink tokens forward RDMA arrivals, whether it needs the per-(token,
expert) pair counts, and how many metadata bytes an fp8 token carries. The network model
(:mod:`placer.simulator.cost.network`) turns those counts into bytes and time; the kernel's
latencies, efficiencies and dtypes are its :class:`~placer.simulator.config.NetworkParams`.

Adding a kernel is one call, no branch to edit: ``register_kernel(MyKernel(name="my-kernel"))``
with any object satisfying :class:`NetworkKernel`; ``NetworkParams(kernel="my-kernel", ...)`` then
selects it (``kernel_preset("my-kernel")`` gives the default parameters unless a preset is added
to ``placer.simulator.config.KERNEL_PRESETS``). The built-in kernels (``nccl``,
``deepep-normal``, ``deepep-ll``, ``deepep-v2``) are registered on import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from placer.errors import InvalidInputError
from placer.simulator.routing import Traffic
from placer.types import Topology

LinkTokens = tuple[np.ndarray, np.ndarray, np.ndarray | None]
"""Dispatch-direction tokens on NVLink and on RDMA, float [L, G, G] (src, dst) each, and the
part of the NVLink tokens that forwards RDMA arrivals (None when the kernel does not forward)."""


@dataclass(frozen=True)
class Fabric:
    """What kernels route by: ``same_node`` bool [G, G] (src and dst share a node),
    ``off_diag`` bool [G, G] (src != dst), and the node shape."""

    same_node: np.ndarray
    off_diag: np.ndarray
    gpus_per_node: int
    num_nodes: int

    @classmethod
    def of(cls, topology: Topology) -> Fabric:
        g = topology.num_gpus
        node = np.arange(g) // topology.gpus_per_node
        return cls(same_node=node[:, None] == node[None, :], off_diag=~np.eye(g, dtype=bool),
                   gpus_per_node=topology.gpus_per_node, num_nodes=topology.num_nodes)


class NetworkKernel(Protocol):
    """The byte accounting of one all-to-all kernel family (see the module docstring)."""

    @property
    def name(self) -> str:
        """The registry key, the value of ``NetworkParams.kernel``."""
        ...

    @property
    def needs_pairs(self) -> bool:
        """Whether :meth:`link_tokens` reads ``Traffic.pairs`` (count-level routing draws them
        only then)."""
        ...

    @property
    def fp8_metadata_bytes(self) -> float:
        """Bytes an fp8 token carries besides its data and 128-block scales."""
        ...

    def link_tokens(self, traffic: Traffic, fabric: Fabric) -> LinkTokens:
        """Dispatch-direction token counts per link (:data:`LinkTokens`)."""
        ...


@dataclass(frozen=True)
class DirectKernel:
    """A token goes once to every rank holding one of its experts, directly (NVLink in the
    node, the NIC across): NCCL's grouped send/recv all-to-all."""

    name: str = "nccl"
    needs_pairs: bool = False
    fp8_metadata_bytes: float = 0.0

    def link_tokens(self, traffic: Traffic, fabric: Fabric) -> LinkTokens:
        counts, same = traffic.tokens, fabric.same_node
        return counts * same, counts * ~same, None


@dataclass(frozen=True)
class ForwardingKernel:
    """DeepEP's normal kernels: once per rank in the node over NVLink; across nodes once per
    remote node over RDMA to the GPU with the sender's local index, which forwards it over
    NVLink to the other ranks of that node that need it."""

    name: str = "deepep-normal"
    needs_pairs: bool = False
    fp8_metadata_bytes: float = 0.0

    def link_tokens(self, traffic: Traffic, fabric: Fabric) -> LinkTokens:
        counts, same = traffic.tokens, fabric.same_node
        if fabric.num_nodes == 1:
            return counts * same, counts * ~same, None
        gpn = fabric.gpus_per_node
        forward = landing_forward(traffic.tokens, gpn)
        _, g_count, n_nodes = traffic.nodes.shape
        landing = np.zeros_like(counts)
        # RDMA from g to the GPU of node m with g's local index.
        cols = np.arange(n_nodes)[None, :] * gpn + (np.arange(g_count) % gpn)[:, None]  # [G, N]
        landing[:, np.arange(g_count)[:, None], cols] = traffic.nodes
        return counts * same + forward, landing, forward


@dataclass(frozen=True)
class PerExpertKernel:
    """DeepEP's low-latency kernels: one message per (token, expert), directly, fp8 tokens with
    16 bytes of metadata."""

    name: str = "deepep-ll"
    needs_pairs: bool = True
    fp8_metadata_bytes: float = 16.0

    def link_tokens(self, traffic: Traffic, fabric: Fabric) -> LinkTokens:
        if traffic.pairs is None:
            raise ValueError(f"{self.name} needs per-pair counts")
        counts, same = traffic.pairs * fabric.off_diag, fabric.same_node
        return counts * same, counts * ~same, None


def landing_forward(tokens: np.ndarray, gpn: int) -> np.ndarray:
    """Forwarded NVLink tokens [L, G, G] (landing GPU -> destination) of the forwarding kernel.

    A token from GPU (n_s, i) to GPU (m, j), m != n_s, lands on GPU (m, i) over RDMA and is
    forwarded to (m, j) when j != i.
    """
    num_layers, g_count, _ = tokens.shape
    n_nodes = g_count // gpn
    t5 = tokens.reshape(num_layers, n_nodes, gpn, n_nodes, gpn)
    remote = ~np.eye(n_nodes, dtype=bool)
    # Sum over source nodes other than m: [L, i, m, j].
    fw = np.einsum("asimj,sm->aimj", t5, remote.astype(tokens.dtype))
    fw[:, np.arange(gpn), :, np.arange(gpn)] = 0.0  # j == i: the landing GPU itself
    out = np.zeros((num_layers, n_nodes, gpn, n_nodes, gpn))
    idx = np.arange(n_nodes)
    out[:, idx, :, idx, :] = fw.transpose(2, 0, 1, 3)  # landing (m, i) -> (m, j)
    return out.reshape(num_layers, g_count, g_count)


_KERNELS: dict[str, NetworkKernel] = {}


def register_kernel(kernel: NetworkKernel, *, replace: bool = False) -> NetworkKernel:
    """Register ``kernel`` under ``kernel.name``; returns it. Raises ValueError when the name
    is taken, unless ``replace``."""
    if kernel.name in _KERNELS and not replace:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    _KERNELS[kernel.name] = kernel
    return kernel


def unregister_kernel(name: str) -> None:
    """Remove the kernel registered as ``name`` (a no-op when there is none)."""
    _KERNELS.pop(name, None)


def network_kernel(name: str) -> NetworkKernel:
    """The kernel registered as ``name``; InvalidInputError when there is none."""
    kernel = _KERNELS.get(name)
    if kernel is None:
        raise InvalidInputError(f"unknown kernel {name!r}; known: {', '.join(_KERNELS)}", source="--kernel")
    return kernel


def kernel_names() -> tuple[str, ...]:
    """The registered kernels' names, in registration order."""
    return tuple(_KERNELS)


# DeepEP V2 (the current release) keeps the normal kernels' route: once per remote node over
# RDMA, then NVLink forwarding; its own constants are in its preset.
for _builtin in (DirectKernel(), ForwardingKernel(), PerExpertKernel(), ForwardingKernel(name="deepep-v2")):
    register_kernel(_builtin)
