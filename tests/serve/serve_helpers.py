"""Helpers of the serve tests: a small model, loads, an HTTP client (urllib) and polling."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import numpy as np

from placer.presets import make_topology
from placer.types import ModelSpec

# 4 MoE layers of 8 experts, top-2, on 4 GPUs (2 experts per GPU); sizes large enough that the
# simulated step time depends on the placement.
MODEL = ModelSpec("tiny-moe", 4, tuple(range(4)), 8, 2, hidden_size=1024, expert_ffn_size=2048)
TOPOLOGY = make_topology("h100", gpus=4)


def shifted_load(hot=(0, 1), base: float = 10.0, peak: float = 400.0) -> list[list[float]]:
    """Experts ``hot`` (both on GPU 0 under the contiguous start) take most of the load."""
    load = np.full((MODEL.num_moe_layers, MODEL.num_experts), base)
    load[:, list(hot)] = peak
    return load.tolist()


def noisy_uniform(seed: int, sigma: float = 0.05) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return (1000.0 * np.exp(rng.normal(0.0, sigma, (MODEL.num_moe_layers, MODEL.num_experts)))).tolist()


class Client:
    """urllib against one service; every call returns (status, headers, body bytes)."""

    def __init__(self, base: str, token: str | None = None):
        self.base, self.token = base, token

    def request(self, method: str, path: str, body: bytes | None = None,
                token: str | None | bool = True) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        tok = self.token if token is True else token
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get_json(self, path: str):
        status, _, body = self.request("GET", path)
        assert status == 200, body
        return json.loads(body)

    def post_stats(self, payload, **kw) -> tuple[int, dict]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, _, body = self.request("POST", "/stats", data, **kw)
        return status, json.loads(body)

    def metrics(self) -> dict[str, float]:
        status, headers, body = self.request("GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.split(" ")
                out[name] = float(value)
        return out


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition"):
    """Poll ``predicate`` until truthy (no assertion on how long it took)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
