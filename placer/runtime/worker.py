"""One expert-parallel rank: the class each Ray actor of a deployment runs.

A rank holds the weights of its ``S`` physical experts in every MoE layer (``slots[l]: [S, W]``,
``W = 3 * F * H`` float32, see :mod:`placer.runtime.model`), every layer's router, and the slot
map its tokens are dispatched with. It joins two torch.distributed process groups made by the
controller: the default group (the forward's all-to-alls) and a migration group (the planner's
point-to-point transfers), gloo on CPU and NCCL on GPU, both with a timeout of a few seconds so
that a dead peer surfaces as an exception instead of a hang (Ray's collective library has no
all-to-all, so torch.distributed is used directly).

The rank is deliberately passive: the controller (:class:`placer.runtime.deployment.Deployment`)
tells it, every step, which layers commit (with the exact writes), which experts to send and
receive, and which received experts to verify. A step runs, in this order: the commits (the map
switch, at the step boundary every rank shares), the posting of the round's non-blocking sends
and receives on the migration group, the forward of the rank's tokens through every layer (its
all-to-alls overlap the transfers), the wait for the transfers, and the checksums of the
received experts the controller asked about.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import uuid
from typing import Any

import numpy as np

from placer.metrics.dispatch import KNUTH_MULTIPLIER
from placer.runtime.model import expert_forward, rms_norm, route, weight_checksum

__all__ = ["EPRank"]


class EPRank:
    """Rank ``rank`` of ``world_size``: weights, slot maps and the expert-parallel forward.

    Parameters
    ----------
    rank, world_size : int
    hidden_size, ffn_size, top_k, slots_per_gpu : int
    router : float32 [L, E, H], every layer's router (replicated on every rank).
    device : "cpu" or "cuda".
    """

    def __init__(self, rank: int, world_size: int, *, hidden_size: int, ffn_size: int, top_k: int,
                 slots_per_gpu: int, router: np.ndarray, device: str = "cpu") -> None:
        import torch  # deferred: torch is an optional extra (runtime)

        torch.set_num_threads(1)
        self.torch = torch
        self.rank, self.world_size = rank, world_size
        self.hidden_size, self.ffn_size, self.top_k = hidden_size, ffn_size, top_k
        self.slots_per_gpu = slots_per_gpu
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.backend = "nccl" if device == "cuda" else "gloo"
        self.router = torch.from_numpy(np.array(router, dtype=np.float32)).to(self.device)
        self.num_layers, self.num_experts = int(router.shape[0]), int(router.shape[1])
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts the actor
        self.slots: list[Any] = []
        self.maps: list[Any] = []
        self.staging: dict[tuple[int, int], Any] = {}
        self.migration_group = None

    # ---- lifecycle ------------------------------------------------------------------------

    def ping(self) -> tuple[str, int]:
        """(incarnation id, pid): a new incarnation means the actor was restarted."""
        return self.incarnation, os.getpid()

    def node_id(self) -> str:
        """The id of the Ray node this rank runs on."""
        import ray  # deferred: ray is an optional extra (runtime)

        return ray.get_runtime_context().get_node_id()

    def address(self) -> tuple[str, int]:
        """This host's address and a free TCP port (the rendezvous of a new process group)."""
        import ray  # deferred: ray is an optional extra (runtime)

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_group(self, init_method: str, timeout_s: float) -> float:
        """Join the default and the migration process group; returns the seconds it took."""
        import torch.distributed as dist  # deferred: torch is an optional extra (runtime)

        start = time.perf_counter()
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(self.backend, init_method=init_method, rank=self.rank,
                                world_size=self.world_size, timeout=timeout)
        self.migration_group = dist.new_group(backend=self.backend, timeout=timeout)
        return time.perf_counter() - start

    def teardown(self) -> None:
        """Leave the process groups (after a failure) and drop staged, uncommitted experts."""
        import torch.distributed as dist  # deferred: torch is an optional extra (runtime)

        self.staging.clear()
        self.migration_group = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def load(self, slot_weights: np.ndarray, maps: list[Any]) -> int:
        """Install weights ``[L, S, W]`` and per-layer slot maps; returns bytes installed."""
        torch = self.torch
        self.slots = [torch.from_numpy(np.array(slot_weights[i], dtype=np.float32)).to(self.device)
                      for i in range(slot_weights.shape[0])]
        self.maps = [self._map(m) for m in maps]
        self.staging.clear()
        return int(slot_weights.nbytes)

    def checksums(self) -> list[list[str]]:
        """Checksum of every slot this rank holds, [L][S] (the controller compares them)."""
        return [[weight_checksum(s.cpu().numpy()) for s in layer] for layer in self.slots]

    def _map(self, spec: Any) -> Any:
        """A layer's slot map: ``("table", [E])`` or ``("positions", rule, log2phy [E, X], cnt [E])``."""
        torch = self.torch
        if spec[0] == "table":
            return ("table", torch.tensor(np.array(spec[1]), dtype=torch.int64, device=self.device))
        return ("positions", spec[1], torch.tensor(np.array(spec[2]), dtype=torch.int64, device=self.device),
                torch.tensor(np.array(spec[3]), dtype=torch.int64, device=self.device))

    # ---- one step -------------------------------------------------------------------------

    def step(self, x: np.ndarray, *, commits: list[dict], sends: list[tuple], recvs: list[tuple],
             verify: list[tuple]) -> tuple[np.ndarray, dict[str, float], list[tuple]]:
        """Commit, post transfers, forward ``x: [t, H]`` (this rank's tokens), wait, verify.

        commits : [{"layer", "writes": [(slot, (layer, slot) staged key)], "copies": [(slot,
            src_slot)], "map": spec}] with local slot indices; writes go first, then copies.
        sends / recvs : [(tag, peer, layer, local slot)]; a receive lands in staging.
        verify : [(layer, local slot, checksum)] of staged experts.

        Returns (output [t, H], seconds of commit / forward / transfer wait / verify, and the
        verify entries whose checksum differs, as (layer, slot, got)).
        """
        import torch.distributed as dist  # deferred: torch is an optional extra (runtime)

        torch = self.torch
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        for c in commits:
            layer = c["layer"]
            for slot, key in c["writes"]:
                self.slots[layer][slot].copy_(self.staging.pop(tuple(key)))
            for slot, src in c["copies"]:
                self.slots[layer][slot].copy_(self.slots[layer][src])
            self.maps[layer] = self._map(c["map"])
        t1 = time.perf_counter()
        works = []
        for tag, peer, layer, slot in sends:
            works.append(dist.isend(self.slots[layer][slot].contiguous(), peer,
                                    group=self.migration_group, tag=tag))
        for tag, peer, layer, slot in recvs:
            buf = torch.empty_like(self.slots[layer][slot])
            self.staging[(layer, slot)] = buf
            works.append(dist.irecv(buf, peer, group=self.migration_group, tag=tag))
        y = self.forward(torch.from_numpy(np.array(x, dtype=np.float32)).to(self.device))
        t2 = time.perf_counter()
        for w in works:
            assert w is not None  # every rank is in the migration group: each send/receive has a Work
            w.wait()
        t3 = time.perf_counter()
        bad = []
        if verify:
            for layer, slot, expected in verify:
                got = weight_checksum(self.staging[(layer, slot)].cpu().numpy())
                if got != expected:
                    bad.append((layer, slot, got))
        t4 = time.perf_counter()
        times.update(commit=t1 - t0, forward=t2 - t1, wait=t3 - t2, verify=t4 - t3)
        return y.cpu().numpy(), times, bad

    def forward(self, x):
        """Every MoE layer on this rank's tokens ``x: [t, H]``; the ranks call it together."""
        import torch.distributed as dist  # deferred: torch is an optional extra (runtime)

        from placer.kernels.ops import permute, unpermute  # deferred: ops imports torch

        torch = self.torch
        g, s = self.world_size, self.slots_per_gpu
        num_slots = g * s
        for layer in range(self.num_layers):
            h = rms_norm(x)
            ids, w = route(h, self.router[layer], self.top_k)
            spec = self.maps[layer]
            if spec[0] == "table":
                smap = spec[1]
            else:  # position rules: replica by global token row (this rank's rows are rank, rank+G, ...)
                _, rule, log2phy, cnt = spec
                pos = self.rank + g * torch.arange(x.shape[0], device=self.device)
                if rule == "vllm":  # vLLM 0.34.0's Knuth hash (placer.metrics.dispatch.replica_index)
                    pos = (pos * KNUTH_MULTIPLIER) & 0xFFFFFFFF
                smap = log2phy[torch.arange(self.num_experts, device=self.device)[None, :],
                               pos[:, None] % cnt[None, :]]
            p = permute(h, ids, smap, num_slots, backend="torch")
            # Rows per (destination rank, its local slot), exchanged so each rank knows its input.
            recv_counts = torch.empty_like(p.slot_counts)
            dist.all_to_all_single(recv_counts, p.slot_counts)
            recv_counts = recv_counts.view(g, s)
            send_split = p.slot_counts.view(g, s).sum(1).tolist()
            recv_split = recv_counts.sum(1).tolist()
            recv = torch.empty((sum(recv_split), x.shape[1]), dtype=x.dtype, device=self.device)
            dist.all_to_all_single(recv, p.rows, recv_split, send_split)
            # Grouped expert compute: rows arrive as [source rank][local slot]; group by slot.
            slot_of_row = torch.repeat_interleave(torch.arange(s, device=self.device).repeat(g),
                                                  recv_counts.reshape(-1))
            order = torch.sort(slot_of_row, stable=True).indices
            grouped = recv[order]
            out = torch.empty_like(grouped)
            start = 0
            for slot, n in enumerate(recv_counts.sum(0).tolist()):
                if n:
                    out[start:start + n] = expert_forward(grouped[start:start + n], self.slots[layer][slot],
                                                          self.hidden_size, self.ffn_size)
                start += n
            back_send = torch.empty_like(out)
            back_send[order] = out
            back = torch.empty_like(p.rows)
            dist.all_to_all_single(back, back_send, send_split, recv_split)
            x = x + unpermute(back, p.row_map, w, backend="torch")
        return x
