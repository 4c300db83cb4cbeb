"""All-to-all cost: per-GPU NVLink and NIC ports, alpha-beta per phase, optional FIFO queuing.

Inside a node every GPU has its own NVLink port (out and in) to the switch; across nodes every
GPU has one NIC (NCCL's all-to-all cannot aggregate NICs, sheet 2.2). A phase on a GPU takes,
on each port that carries bytes, ``hop_s + bytes / (bandwidth * efficiency)``; on a cluster
with a bandwidth per rank pair (``--topology FILE``) each pair's bytes take their own pair's
bandwidth, summed over the port's pairs (FIFO queuing and the all-gather use the tiers' means,
``Topology.nvlink_gbps`` and ``nic_gbps``). The GPU is done
when its slowest port is, plus the kernel's launch latency, and the phase ends when the slowest
GPU is (the all-to-all is a barrier). ``congestion="fifo"`` replaces the closed form by
serialising the messages on each port in NCCL's peer order (ASTRA-sim congestion-aware style).

Byte accounting is the kernel's (:mod:`placer.simulator.network_kernels`, registered by name:
``nccl`` direct, ``deepep-normal`` once per remote node then NVLink forwarding, ``deepep-ll`` once
per (token, expert)); the dispatch direction, combine is the reverse with combine bytes.

fp8 tokens carry one fp32 scale per 128 elements (``h + h/128*4`` bytes), plus the kernel's
metadata (16 bytes in the low-latency kernels); bf16 tokens are ``2*h`` (DeepEP's tests, sheet 2.5).
Context-coherent execution adds the state moves (bf16 hidden states, point to point) to the
dispatch phase.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from placer._numba import njit
from placer.simulator.config import HBM_EFFICIENCY, SIMAI_ATA_RATIO, SIMAI_ATA_SIZES, NetworkParams
from placer.simulator.network_kernels import Fabric, network_kernel
from placer.simulator.routing import Traffic
from placer.types import ModelSpec, Topology


def token_bytes(hidden: int, dtype: str, kernel: str) -> float:
    """Bytes of one token on the wire: fp8 with 128-block fp32 scales (+ the kernel's metadata,
    16 B in the low-latency kernels) or bf16."""
    if dtype == "bf16":
        return 2.0 * hidden
    return hidden + hidden / 128 * 4 + network_kernel(kernel).fp8_metadata_bytes


@dataclass(frozen=True)
class LinkBytes:
    """Bytes of one phase per layer: ``nvlink``, ``rdma`` float [L, G, G] (src, dst); ``forward``
    is the part of ``nvlink`` that forwards RDMA arrivals (forwarding kernels, else None).
    ``rdma_messages`` float [L, G, G]: NIC messages per pair (only when the kernel's parameters
    set a message rate); ``received`` float [L, G]: bytes each GPU's receive side packs (only
    when they set ``recv_hbm_passes``)."""

    nvlink: np.ndarray
    rdma: np.ndarray
    forward: np.ndarray | None = None
    rdma_messages: np.ndarray | None = None
    received: np.ndarray | None = None


@dataclass(frozen=True)
class PhaseTimes:
    """``time_s [L]`` per layer; ``rank_s [L, G]`` when each GPU finished."""

    time_s: np.ndarray
    rank_s: np.ndarray


@dataclass(frozen=True)
class StepNetwork:
    """One step's all-to-all: dispatch and combine :class:`PhaseTimes`, and per (src, dst) pair
    float [G, G] NVLink and RDMA bytes and busy seconds, summed over layers and both phases."""

    dispatch: PhaseTimes
    combine: PhaseTimes
    nvlink_bytes: np.ndarray
    rdma_bytes: np.ndarray
    nvlink_busy_s: np.ndarray
    rdma_busy_s: np.ndarray


class NetworkModel:
    """Turns :class:`Traffic` into link bytes and phase times for one kernel and cluster."""

    def __init__(self, params: NetworkParams, topology: Topology, model: ModelSpec):
        self.params = params
        self.topology = topology
        self.kernel = network_kernel(params.kernel)
        self.fabric = Fabric.of(topology)
        self.same_node = self.fabric.same_node
        self.dispatch_bytes = token_bytes(model.hidden_size, params.dispatch_dtype, params.kernel)
        self.combine_bytes = token_bytes(model.hidden_size, params.combine_dtype, params.kernel)
        self.state_bytes = 2.0 * model.hidden_size
        nv_eff = params.nvlink_efficiency
        if params.forward_efficiency is not None and topology.num_nodes > 1:
            nv_eff = params.forward_efficiency
        self.nvlink_Bps = topology.nvlink_gbps * 1e9 * nv_eff
        self.rdma_Bps = topology.nic_gbps * 1e9 * params.rdma_efficiency
        self.hbm_Bps = topology.hbm_gbps * 1e9 * HBM_EFFICIENCY
        # A cluster with its own bandwidth per rank pair (--topology FILE): seconds per byte of
        # each pair on its kind of link, float [G, G] (zero where the link kind is not used).
        self.pair_s_per_byte: tuple[np.ndarray, np.ndarray] | None = None
        if topology.bandwidth_gbps is not None:
            bw = topology.bandwidth_matrix() * 1e9
            self.pair_s_per_byte = (np.where(self.same_node, 1.0 / (bw * nv_eff), 0.0),
                                    np.where(self.same_node, 0.0, 1.0 / (bw * params.rdma_efficiency)))

    # -- token counts per link -------------------------------------------------------------

    def link_tokens(self, traffic: Traffic) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Dispatch-direction tokens on NVLink and RDMA, float [L, G, G] (src, dst) each, and
        the forwarded part of the NVLink tokens (None unless the kernel forwards)."""
        return self.kernel.link_tokens(traffic, self.fabric)

    def link_bytes(self, traffic: Traffic) -> tuple[LinkBytes, LinkBytes]:
        """Dispatch and combine :class:`LinkBytes` of ``traffic`` (combine is the reverse)."""
        nv, rd, fw = self.link_tokens(traffic)
        db, cb = self.dispatch_bytes, self.combine_bytes
        p = self.params
        messages = rd if p.message_rate is not None else None
        recv_d = recv_c = None
        if p.recv_hbm_passes > 0:
            local = self._local(traffic)
            recv_d = ((nv + rd).sum(axis=1) + local) * db
            recv_c = ((nv + rd).sum(axis=2) + local) * cb
        dispatch = LinkBytes(nvlink=nv * db, rdma=rd * db, forward=None if fw is None else fw * db,
                             rdma_messages=messages, received=recv_d)
        combine = LinkBytes(nvlink=nv.transpose(0, 2, 1) * cb, rdma=rd.transpose(0, 2, 1) * cb,
                            forward=None if fw is None else fw.transpose(0, 2, 1) * cb,
                            rdma_messages=None if messages is None else messages.transpose(0, 2, 1),
                            received=recv_c)
        if traffic.moves is not None:
            moved = traffic.moves * self.state_bytes
            dispatch = replace(dispatch, nvlink=dispatch.nvlink + moved * self.same_node,
                               rdma=dispatch.rdma + moved * ~self.same_node)
        return dispatch, combine

    # -- time -------------------------------------------------------------------------------

    def _efficiency(self, port_bytes: np.ndarray) -> np.ndarray:
        """SimAI's all-to-all efficiency (with ``size_curve``, as nccl's preset; else 1) for each
        port, read at the total an all-to-all moving ``port_bytes`` on every port would have. Per
        port, so that bytes added elsewhere never speed a port up; ``bytes / efficiency`` still
        grows with the bytes."""
        if not self.params.size_curve:
            return np.ones_like(port_bytes)
        n_nodes = self.topology.num_nodes
        column = min(SIMAI_ATA_RATIO, key=lambda k: (abs(np.log2(k) - np.log2(n_nodes)), k))
        total = np.maximum(port_bytes * self.topology.num_gpus, 1.0)
        return np.interp(np.log2(total), np.log2(SIMAI_ATA_SIZES), SIMAI_ATA_RATIO[column])

    @staticmethod
    def _local(traffic: Traffic) -> np.ndarray:
        """Token units served on their sender's own GPU, float [L, G] (the pairs' diagonal;
        zero for count-only traffic)."""
        if traffic.pairs is None:
            return np.zeros(traffic.src.shape)
        return np.diagonal(traffic.pairs, axis1=1, axis2=2).copy()

    def _fixed(self, received: np.ndarray | None) -> np.ndarray | float:
        """Per-GPU cost outside the ports: the kernel's launch latency, plus the receive-side
        pack (``received`` bytes [L, G] over HBM, ``recv_hbm_passes`` times) when modelled."""
        p = self.params
        if received is None or p.recv_hbm_passes <= 0:
            return p.launch_s
        return p.launch_s + received * p.recv_hbm_passes / self.hbm_Bps

    def _closed_form(self, nv_out, nv_in, rd_out, rd_in, forwarded: bool, rd_messages=None,
                     received=None, port_s=None) -> PhaseTimes:
        """Per-GPU phase time from per-port bytes [L, G]; ``rd_messages`` [L, G]: messages on
        the busier NIC direction (bounded by ``message_rate``), ``received`` [L, G]: packed bytes;
        ``port_s``: (NVLink, RDMA) seconds [L, G] of the busier direction at the pairs' own
        bandwidths (:meth:`_port_seconds`), else the bytes over the port's bandwidth."""
        p = self.params
        nv = np.maximum(nv_out, nv_in)
        rd = np.maximum(rd_out, rd_in)
        nv_full, rd_full = (nv / self.nvlink_Bps, rd / self.rdma_Bps) if port_s is None else port_s
        rd_hop = self._rdma_hop(forwarded)
        rd_s = rd_full / self._efficiency(rd)
        if rd_messages is not None and p.message_rate is not None:
            rd_s = np.maximum(rd_s, rd_messages / p.message_rate)
        rank = np.maximum(np.where(nv > 0, p.nvlink_hop_s + nv_full / self._efficiency(nv), 0.0),
                          np.where(rd > 0, rd_hop + rd_s, 0.0)) + self._fixed(received)
        return PhaseTimes(time_s=rank.max(axis=1), rank_s=rank)

    def _port_seconds(self, nv: np.ndarray, rd: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(NVLink, RDMA) seconds [L, G] of the busier direction of each GPU's ports, every
        pair's bytes (``nv``, ``rd`` float [L, G, G], src to dst) at its own bandwidth; None
        without a per-pair matrix (the bytes over the port's bandwidth are the same then)."""
        if self.pair_s_per_byte is None:
            return None
        nv_sb, rd_sb = self.pair_s_per_byte
        nv_s, rd_s = nv * nv_sb, rd * rd_sb
        return (np.maximum(nv_s.sum(axis=2), nv_s.sum(axis=1)), np.maximum(rd_s.sum(axis=2), rd_s.sum(axis=1)))

    def _rdma_hop(self, forwarded: bool) -> float:
        """Latency of the RDMA path: the NIC hop, plus the NVLink hop when the kernel forwards."""
        p = self.params
        return p.rdma_hop_s + (p.nvlink_hop_s if forwarded else 0.0)

    def phase_times(self, link: LinkBytes) -> PhaseTimes:
        """Per-layer phase time and per-GPU finish times of one all-to-all phase."""
        p = self.params
        msgs = link.rdma_messages if p.message_rate is not None else None
        if p.congestion != "fifo":
            rd_msgs = None if msgs is None else np.maximum(msgs.sum(axis=2), msgs.sum(axis=1))
            return self._closed_form(link.nvlink.sum(axis=2), link.nvlink.sum(axis=1), link.rdma.sum(axis=2),
                                     link.rdma.sum(axis=1), link.forward is not None, rd_msgs, link.received,
                                     self._port_seconds(link.nvlink, link.rdma))
        direct = link.nvlink if link.forward is None else link.nvlink - link.forward
        forward = np.zeros_like(link.nvlink) if link.forward is None else link.forward
        nv_port = np.maximum(link.nvlink.sum(axis=2), link.nvlink.sum(axis=1))
        rd_port = np.maximum(link.rdma.sum(axis=2), link.rdma.sum(axis=1))
        msg_s = np.zeros_like(link.rdma) if msgs is None or p.message_rate is None else msgs / p.message_rate
        rank = _fifo(direct, forward, link.rdma, msg_s, self.nvlink_Bps * self._efficiency(nv_port),
                     self.rdma_Bps * self._efficiency(rd_port), p.nvlink_hop_s,
                     self._rdma_hop(link.forward is not None)) + self._fixed(link.received)
        return PhaseTimes(time_s=rank.max(axis=1), rank_s=rank)

    def evaluate(self, traffic: Traffic) -> StepNetwork:
        """Both phases of a step and the bytes per (src, dst) pair, summed over layers.

        The closed form needs only per-port sums, taken once in token units (combine is the
        reverse of dispatch); FIFO queuing builds the per-layer byte matrices.
        """
        if self.params.congestion == "fifo":
            d, c = self.link_bytes(traffic)
            nv_pair = d.nvlink.sum(axis=0) + c.nvlink.sum(axis=0)
            rd_pair = d.rdma.sum(axis=0) + c.rdma.sum(axis=0)
            return StepNetwork(self.phase_times(d), self.phase_times(c), nv_pair, rd_pair, *self._busy_s(nv_pair, rd_pair))
        nv, rd, fw = self.link_tokens(traffic)
        db, cb = self.dispatch_bytes, self.combine_bytes
        nv_out, nv_in, rd_out, rd_in = nv.sum(axis=2), nv.sum(axis=1), rd.sum(axis=2), rd.sum(axis=1)
        nv_t, rd_t = nv.sum(axis=0), rd.sum(axis=0)
        nv_pair, rd_pair = nv_t * db + nv_t.T * cb, rd_t * db + rd_t.T * cb
        d_nv_out, d_nv_in, d_rd_out, d_rd_in = nv_out * db, nv_in * db, rd_out * db, rd_in * db
        if traffic.moves is not None:
            sb, same = self.state_bytes, self.same_node
            mv_nv, mv_rd = traffic.moves * same, traffic.moves * ~same
            d_nv_out = d_nv_out + mv_nv.sum(axis=2) * sb
            d_nv_in = d_nv_in + mv_nv.sum(axis=1) * sb
            d_rd_out = d_rd_out + mv_rd.sum(axis=2) * sb
            d_rd_in = d_rd_in + mv_rd.sum(axis=1) * sb
            nv_pair = nv_pair + mv_nv.sum(axis=0) * sb
            rd_pair = rd_pair + mv_rd.sum(axis=0) * sb
        forwarded = fw is not None
        p = self.params
        rd_msgs = np.maximum(rd_out, rd_in) if p.message_rate is not None else None
        recv_d = recv_c = None
        if p.recv_hbm_passes > 0:
            local = self._local(traffic)
            recv_d, recv_c = (nv_in + rd_in + local) * db, (nv_out + rd_out + local) * cb
        port_d = port_c = None
        if self.pair_s_per_byte is not None:  # every pair at its own bandwidth (the state moves too)
            nv_d, rd_d = nv * db, rd * db
            if traffic.moves is not None:
                nv_d = nv_d + traffic.moves * self.same_node * self.state_bytes
                rd_d = rd_d + traffic.moves * ~self.same_node * self.state_bytes
            port_d = self._port_seconds(nv_d, rd_d)
            port_c = self._port_seconds(nv.transpose(0, 2, 1) * cb, rd.transpose(0, 2, 1) * cb)
        dispatch = self._closed_form(d_nv_out, d_nv_in, d_rd_out, d_rd_in, forwarded, rd_msgs, recv_d, port_d)
        combine = self._closed_form(nv_in * cb, nv_out * cb, rd_in * cb, rd_out * cb, forwarded, rd_msgs, recv_c,
                                    port_c)
        return StepNetwork(dispatch, combine, nv_pair, rd_pair, *self._busy_s(nv_pair, rd_pair))

    def _busy_s(self, nv_pair: np.ndarray, rd_pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Busy seconds of NVLink and RDMA bytes per (src, dst) pair float [G, G]."""
        if self.pair_s_per_byte is None:
            return nv_pair / self.nvlink_Bps, rd_pair / self.rdma_Bps
        return nv_pair * self.pair_s_per_byte[0], rd_pair * self.pair_s_per_byte[1]


@njit
def _message(out_free, in_free, g, d, seconds, hop, ready):  # pragma: no cover - numba
    """One message g -> d on a FIFO port pair: it takes g's out port once free (and ``ready``),
    reaches d's in port after ``hop``, and holds each port for ``seconds``."""
    start = max(out_free[g], ready)
    out_free[g] = start + seconds
    arrive = max(in_free[d], start + hop) + seconds
    in_free[d] = max(arrive, out_free[g] + hop)


@njit
def _fifo(direct, forward, rdma, rdma_msg_s, nv_bw, rd_bw, nv_hop, rd_hop):  # pragma: no cover - numba
    """Per-port FIFO: messages in NCCL's peer order (step i: g -> g+i), store and forward.

    ``direct``, ``forward``, ``rdma``: float [L, G, G] bytes; ``rdma_msg_s`` float [L, G, G]: the
    NIC message-rate floor of each RDMA transfer (0 when not modelled); ``nv_bw``, ``rd_bw``:
    [L, G] B/s per port (a message moves at the slower of its two ports). A message occupies its source's
    egress port, then (after the hop latency) its destination's ingress port; forwarded NVLink
    messages leave the landing GPU only after every RDMA message into it has arrived. A GPU
    finishes when its last outgoing message has landed and its last incoming one has arrived.
    Returns float [L, G] finish times.
    """
    num_layers, g_count, _ = direct.shape
    out = np.zeros((num_layers, g_count))
    for layer in range(num_layers):
        nv_out = np.zeros(g_count)
        nv_in = np.zeros(g_count)
        rd_out = np.zeros(g_count)
        rd_in = np.zeros(g_count)
        for step in range(1, g_count):
            for g in range(g_count):
                d = (g + step) % g_count
                if rdma[layer, g, d] > 0:
                    t = max(rdma[layer, g, d] / min(rd_bw[layer, g], rd_bw[layer, d]), rdma_msg_s[layer, g, d])
                    _message(rd_out, rd_in, g, d, t, rd_hop, 0.0)
                if direct[layer, g, d] > 0:
                    t = direct[layer, g, d] / min(nv_bw[layer, g], nv_bw[layer, d])
                    _message(nv_out, nv_in, g, d, t, nv_hop, 0.0)
        for step in range(1, g_count):
            for g in range(g_count):
                d = (g + step) % g_count
                if forward[layer, g, d] > 0:
                    t = forward[layer, g, d] / min(nv_bw[layer, g], nv_bw[layer, d])
                    _message(nv_out, nv_in, g, d, t, nv_hop, rd_in[g])
        for g in range(g_count):
            # A sender is done when its last message has landed: its egress finish plus the hop.
            nv_done = nv_out[g] + nv_hop if nv_out[g] > 0 else 0.0
            rd_done = rd_out[g] + rd_hop if rd_out[g] > 0 else 0.0
            out[layer, g] = max(max(nv_done, nv_in[g]), max(rd_done, rd_in[g]))
    return out


def allgather_s(network: NetworkModel, tokens_per_rank: np.ndarray) -> float:
    """Per-step all-gather of the step's new tokens (context-coherent execution), seconds.

    Hierarchical: every GPU receives the other nodes' tokens through the NICs, a 1/gpus_per_node
    share each, then the rest of the node's copies over NVLink. ``tokens_per_rank``: float [G].
    """
    p, topo = network.params, network.topology
    n = np.asarray(tokens_per_rank, dtype=np.float64)
    total = n.sum()
    if total <= 0 or topo.num_gpus == 1:
        return 0.0
    per_node = n.reshape(topo.num_nodes, topo.gpus_per_node).sum(axis=1)
    remote = (total - per_node).max() * network.state_bytes / topo.gpus_per_node
    nvlink = (total - n.min()) * network.state_bytes
    t = nvlink / network.nvlink_Bps + p.nvlink_hop_s
    if topo.num_nodes > 1:
        t = max(t, remote / network.rdma_Bps + p.rdma_hop_s)
    return float(t + p.launch_s)
