"""Routing capture and streaming statistics.

``stats`` (StatsBuilder, merge), ``summary`` (per-layer skew and affinity), ``capture`` (router
hooks on transformers models), ``hf`` (loading and batching models), ``embedded`` (the shipped
default model), ``sglang_driver`` (a live SGLang recorder), ``vllm_r3`` (saved R3 outputs) and
``profile`` (what ``placer profile`` calls). Nothing here imports torch at import time.
"""
