"""Routing capture (the streaming statistics it feeds are :mod:`placer.stats`, below io).

``summary`` (per-layer skew and affinity), ``capture`` (router hooks on transformers models),
``hf`` (loading and batching models), ``embedded`` (the shipped default model),
``sglang_driver`` (a live SGLang recorder), ``vllm_r3`` (saved R3 outputs, read by
:mod:`placer.io.r3`) and ``profile`` (what ``placer profile`` calls); ``stats`` re-exports
:mod:`placer.stats` until its last importers move. Nothing here imports torch at import time.
"""
