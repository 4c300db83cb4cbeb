"""The model and the cluster a placement is for: :class:`ModelSpec` and :class:`Topology`.

Import them from :mod:`placer.types` (the glossary of symbols is there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from placer.types._fields import bad_field
from placer.types.links import cluster_graph, two_level_matrix

_Spec = TypeVar("_Spec", "ModelSpec", "Topology")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a MoE model as far as placement, traffic and memory are concerned.

    ``moe_layer_ids`` are absolute hidden-layer indices of the MoE layers (DeepSeek-V3: 3..60).
    ``hidden_size`` and ``expert_ffn_size`` may be 0 when unknown (then bytes and memory are
    not computed). ``activation_bytes`` is bytes per hidden element on the wire,
    ``weight_bytes`` bytes per expert weight element.
    """

    name: str
    num_hidden_layers: int
    moe_layer_ids: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int = 0
    expert_ffn_size: int = 0
    num_shared_experts: int = 0
    num_groups: int = 1
    topk_groups: int = 1
    activation_bytes: float = 2.0
    weight_bytes: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layer_ids", tuple(int(i) for i in self.moe_layer_ids))
        ids = self.moe_layer_ids
        if self.num_experts < 1 or self.top_k < 1 or self.top_k > self.num_experts:
            raise bad_field("model", f"need 1 <= top_k <= num_experts, got top_k={self.top_k}, "
                            f"num_experts={self.num_experts}")
        if not ids:
            raise bad_field("model", "moe_layer_ids is empty")
        if list(ids) != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.num_hidden_layers:
            raise bad_field("model", f"moe_layer_ids must be increasing and within "
                            f"[0, {self.num_hidden_layers}), got {ids[0]}..{ids[-1]}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise bad_field("model", f"num_groups={self.num_groups} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise bad_field("model", f"topk_groups={self.topk_groups} must be in [1, num_groups]")
        if min(self.hidden_size, self.expert_ffn_size, self.num_shared_experts) < 0:
            raise bad_field("model", "sizes must be non-negative")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def sizes_known(self) -> bool:
        return self.hidden_size > 0 and self.expert_ffn_size > 0

    @property
    def token_bytes(self) -> float:
        """Bytes of one token's hidden state on the wire (0 when the hidden size is unknown)."""
        return float(self.hidden_size * self.activation_bytes)

    @property
    def expert_weight_bytes(self) -> float:
        """Bytes of one routed expert's weights: gate, up and down projections, 3 * h * I."""
        return float(3 * self.hidden_size * self.expert_ffn_size * self.weight_bytes)

    @classmethod
    def from_shape(cls, num_layers: int, num_experts: int, top_k: int, name: str = "custom") -> ModelSpec:
        """A model known only by its routing shape (every layer is MoE, sizes unknown)."""
        return cls(name=name, num_hidden_layers=num_layers, moe_layer_ids=tuple(range(num_layers)),
                   num_experts=num_experts, top_k=top_k)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["moe_layer_ids"] = list(self.moe_layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return _from_fields(cls, d, "model")


@dataclass(frozen=True)
class Topology:
    """A GPU cluster: ``num_nodes`` nodes (NVLink domains) of ``gpus_per_node`` GPUs, one NIC
    per GPU.

    Bandwidths are achievable GB/s per GPU per direction, latencies seconds, memory bytes per
    GPU, peak FLOP/s dense. ``bandwidth_gbps`` (a G x G matrix read from a file, the diagonal
    unused) gives every pair of ranks its own bandwidth; ``nvlink_gbps`` and ``nic_gbps`` are
    then its tiers' harmonic means (:func:`placer.types.links.tier_gbps`). Without it, a pair
    in one node has ``nvlink_gbps`` and a pair across nodes ``nic_gbps``
    (:meth:`bandwidth_matrix`). ``gpu_speed`` (one factor per GPU, 1 = the preset's GPU, 0.5
    = half its throughput) makes load balance a matter of time (:meth:`time_scale`).
    """

    name: str
    num_nodes: int
    gpus_per_node: int
    nvlink_gbps: float = 370.0
    nvlink_latency_s: float = 3e-6
    nic_gbps: float = 48.5
    nic_latency_s: float = 6e-6
    hbm_gbps: float = 3350.0
    bf16_flops: float = 989e12
    fp8_flops: float = 1979e12
    memory_bytes: float = 80e9
    bandwidth_gbps: tuple[tuple[float, ...], ...] | None = None
    gpu_speed: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise bad_field("cluster", f"need at least one node and one GPU per node, got "
                            f"{self.num_nodes} x {self.gpus_per_node}")
        for name in ("nvlink_gbps", "nic_gbps", "hbm_gbps", "bf16_flops", "fp8_flops", "memory_bytes"):
            v = getattr(self, name)
            if not np.isfinite(v) or v <= 0:
                raise bad_field("cluster", f"{name} must be positive, got {v}")
        if self.bandwidth_gbps is not None:
            m = np.array(self.bandwidth_gbps, dtype=np.float64)
            g = self.num_gpus
            if m.shape != (g, g):
                raise bad_field("cluster", f"bandwidth_gbps must be {g} x {g}, got shape {m.shape}")
            off = m[~np.eye(g, dtype=bool)]
            if not np.all(np.isfinite(off)) or np.any(off <= 0):
                raise bad_field("cluster", "bandwidth_gbps must be positive and finite off the diagonal")
            np.fill_diagonal(m, 0.0)  # unused; 0 keeps the file JSON
            object.__setattr__(self, "bandwidth_gbps", tuple(tuple(float(v) for v in row) for row in m))
        if self.gpu_speed is not None:
            speed = np.asarray(self.gpu_speed, dtype=np.float64)
            if speed.shape != (self.num_gpus,):
                raise bad_field("cluster", f"gpu_speed must hold one factor per GPU ({self.num_gpus}), "
                                           f"got shape {speed.shape}")
            if not np.all(np.isfinite(speed)) or np.any(speed <= 0):
                raise bad_field("cluster", "gpu_speed factors must be positive and finite")
            object.__setattr__(self, "gpu_speed", tuple(float(v) for v in speed))

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def gpu_preset(self) -> str:
        """The ``--cluster`` preset of the GPU (a cluster read from a file is named ``PRESET:FILE``)."""
        return self.name.split(":")[0]

    def node_of_gpu(self, gpu: np.ndarray | int) -> np.ndarray | int:
        return np.asarray(gpu) // self.gpus_per_node if not isinstance(gpu, int) else gpu // self.gpus_per_node

    def bandwidth_matrix(self) -> np.ndarray:
        """float [G, G] GB/s between every two ranks (``inf`` on the diagonal): ``bandwidth_gbps``,
        else NVLink inside a node and the NIC across nodes."""
        if self.bandwidth_gbps is None:
            return two_level_matrix(self.num_nodes, self.gpus_per_node, self.nvlink_gbps, self.nic_gbps)
        m = np.array(self.bandwidth_gbps, dtype=np.float64)
        np.fill_diagonal(m, np.inf)
        return m

    def time_scale(self) -> np.ndarray:
        """float [G]: how long a token-slot takes on each GPU relative to the mean GPU (the mean
        speed over the GPU's speed; all 1 without ``gpu_speed``). A GPU's load times its scale is
        its load as time: a split in proportion to the speeds makes every GPU's time the mean load."""
        if self.gpu_speed is None:
            return np.ones(self.num_gpus)
        speed = np.asarray(self.gpu_speed, dtype=np.float64)
        return speed.mean() / speed

    def graph(self) -> Any:
        """The cluster as a ``networkx.Graph`` of ranks and links (:func:`placer.types.links.cluster_graph`)."""
        matrix = None if self.bandwidth_gbps is None else self.bandwidth_matrix()
        return cluster_graph(self.num_nodes, self.gpus_per_node, self.nvlink_gbps, self.nic_gbps, matrix)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key in ("bandwidth_gbps", "gpu_speed"):
            if out[key] is None:
                del out[key]  # files of uniform two-level clusters stay as they were
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Topology:
        return _from_fields(cls, d, "topology")


def _from_fields(cls: type[_Spec], d: dict[str, Any], what: str) -> _Spec:
    """``cls`` built from the entries of ``d`` that name its fields (other entries are ignored)."""
    try:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
    except TypeError as exc:
        raise bad_field(what, f"incomplete {what} description: {exc}") from None
