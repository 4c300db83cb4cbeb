"""Compute cost: roofline of grouped expert GEMMs, attention and dense layers per GPU.

``time = max(FLOPs / (peak * efficiency(rows)), bytes / (HBM * hbm_efficiency)) + launch``.
The GEMM efficiency at ``rows`` tokens per expert interpolates DeepGEMM's grouped-GEMM figures
(log-linear in rows, clamped at the ends); below the ridge the HBM side dominates, as DeepGEMM's
small-M rows are. fp8 peak applies when the model's weights are 1 byte or less, bf16 otherwise.
Shared experts run locally on every token of the GPU. Tensor parallelism is not modelled.
"""

from __future__ import annotations

import numpy as np

from placer.costs import expert_flops, ffn_flops
from placer.simulator.config import ComputeParams
from placer.types import ModelSpec, Topology


def attention_params(params: ComputeParams, model: ModelSpec) -> float:
    """Attention weights per layer (elements): ``params.attention_params``, else ``4*h*h``."""
    h = model.hidden_size
    return float(params.attention_params if params.attention_params is not None else 4.0 * h * h)


def kv_bytes_per_token(params: ComputeParams, model: ModelSpec) -> float:
    """KV-cache bytes per context token per layer: ``params.kv_bytes_per_token``, else a GQA
    cache with 8 query heads per KV head, K and V at the activation width (``2*h/8*bytes``)."""
    return float(params.kv_bytes_per_token if params.kv_bytes_per_token is not None
                 else 2.0 * model.hidden_size / 8 * model.activation_bytes)


class ComputeModel:
    """Per-GPU compute times of one model on one GPU kind (each GPU's times over its speed
    factor when the cluster's GPUs differ, ``Topology.gpu_speed``)."""

    def __init__(self, params: ComputeParams, topology: Topology, model: ModelSpec, slots_per_gpu: int):
        self.params = params
        self.model = model
        self.spg = slots_per_gpu
        h, inter = model.hidden_size, model.expert_ffn_size
        self.expert_flops = expert_flops(model)
        self.expert_weight = 3.0 * h * inter * model.weight_bytes
        self.expert_act = (2.0 * h + 2.0 * inter) * 2.0
        self.peak = topology.fp8_flops if model.weight_bytes <= 1.0 else topology.bf16_flops
        self.bf16_peak = topology.bf16_flops
        self.hbm = topology.hbm_gbps * 1e9 * params.hbm_efficiency
        rows, eff = zip(*sorted(params.gemm_efficiency), strict=True)
        self._log_rows = np.log(np.asarray(rows, dtype=np.float64))
        self._eff = np.asarray(eff, dtype=np.float64)
        self.attention_params = attention_params(params, model)
        self.kv_bytes = kv_bytes_per_token(params, model)
        dense_inter = (model.top_k + model.num_shared_experts) * inter
        self.dense_flops = ffn_flops(h, dense_inter)
        self.dense_weight = 3.0 * h * dense_inter * model.weight_bytes
        # GPUs of different speeds (--gpu-speed): each GPU's times over its throughput factor
        self.slowdown = None if topology.gpu_speed is None else 1.0 / np.asarray(topology.gpu_speed, np.float64)

    def _per_gpu(self, seconds: np.ndarray) -> np.ndarray:
        """``seconds`` float [..., G] on each GPU at its own speed."""
        return seconds if self.slowdown is None else seconds * self.slowdown

    def efficiency(self, rows: np.ndarray) -> np.ndarray:
        """GEMM efficiency at ``rows`` tokens per expert (same shape)."""
        return np.interp(np.log(np.maximum(rows, 1.0)), self._log_rows, self._eff)

    def _roofline(self, flops, bytes_, rows, peak) -> np.ndarray:
        return np.maximum(flops / (peak * self.efficiency(rows)), bytes_ / self.hbm)

    def expert_times(self, slot_pairs: np.ndarray, local_tokens: np.ndarray) -> np.ndarray:
        """Expert phase per GPU: routed grouped GEMMs plus shared experts.

        ``slot_pairs``: float [L, P] token-expert pairs per slot; ``local_tokens``: float [L, G]
        tokens whose shared experts run on each GPU. Returns float [L, G] seconds.
        """
        num_layers = slot_pairs.shape[0]
        rows = slot_pairs.reshape(num_layers, -1, self.spg)
        pairs = rows.sum(axis=2)
        active = (rows > 0).sum(axis=2)
        mean_rows = np.divide(pairs, active, out=np.zeros_like(pairs), where=active > 0)
        routed = self._roofline(self.expert_flops * pairs, self.expert_weight * active + self.expert_act * pairs,
                                mean_rows, self.peak)
        out = routed + self.params.gemm_launch_s
        shared = self.model.num_shared_experts
        if shared:
            t = local_tokens
            out = out + np.where(t > 0, self._roofline(shared * self.expert_flops * t,
                                                       shared * (self.expert_weight + self.expert_act * t),
                                                       t, self.peak) + self.params.gemm_launch_s, 0.0)
        return self._per_gpu(out)

    def attention_times(self, tokens: np.ndarray, decode_context: np.ndarray, prefill_positions: np.ndarray) -> np.ndarray:
        """Attention of one layer per GPU.

        ``tokens``: float [..., G] tokens on each GPU; ``decode_context``: context tokens read by
        the decode tokens; ``prefill_positions``: sum over prefill tokens of their position.
        Returns seconds, same shape.
        """
        h = self.model.hidden_size
        flops = 2.0 * self.attention_params * tokens + 4.0 * h * prefill_positions
        bytes_ = (self.attention_params * self.model.activation_bytes * (tokens > 0)
                  + self.kv_bytes * (decode_context + tokens))
        t = self._roofline(flops, bytes_, tokens, self.bf16_peak)
        return self._per_gpu(np.where(tokens > 0, t + self.params.attention_launch_s, 0.0))

    def dense_times(self, tokens: np.ndarray) -> np.ndarray:
        """The FFN of a dense (non-MoE) layer per GPU, float [G] seconds."""
        t = self._roofline(self.dense_flops * tokens, self.dense_weight + 4.0 * self.model.hidden_size * tokens,
                           tokens, self.peak)
        return self._per_gpu(np.where(tokens > 0, t + self.params.gemm_launch_s, 0.0))
