"""The SGLang recorder driver against a local HTTP stand-in that writes dumps in the real format.

The stand-in serves the three recorder endpoints like ``sglang/srt/entrypoints/http_server.py``
and, on dump, torch.saves what ``sglang/srt/eplb/expert_distribution.py`` writes for each mode:
``stat``: one file ``{"rank", "logical_count" int32 [buffer_steps, num_layers, E],
"average_utilization_rate_over_window"}``; ``per_pass`` / ``per_token``: one file per rank
``{"records": [...], "last_physical_to_logical_map": [num_layers, P]}``.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from placer.cli import main  # noqa: E402
from placer.errors import InvalidInputError  # noqa: E402
from placer.io.native import read_stats_npz  # noqa: E402
from placer.presets import get_model  # noqa: E402
from placer.profiling.sglang_driver import profile_sglang  # noqa: E402

pytestmark = pytest.mark.timeout(60)

MODEL = get_model("mixtral-8x7b")  # 32 layers, all MoE, E=8, top-2
L, E, K = 32, 8, 2
P = 12  # 4 redundant slots: 3 per rank on 4 ranks


def p2l_map(rng) -> np.ndarray:
    rows = [np.concatenate([rng.permutation(E), rng.choice(E, P - E, replace=False)]) for _ in range(L)]
    return np.asarray(rows, dtype=np.int64)


class StandIn:
    """Expected logical load of what it dumped, per mode."""

    def __init__(self, mode: str, dump_dir, fail_with: int | None = None, write: bool = True):
        self.mode, self.dump_dir, self.fail_with, self.write = mode, dump_dir, fail_with, write
        self.calls: list[str] = []
        self.rng = np.random.default_rng(0)
        self.expected = np.zeros((L, E), np.int64)
        self.tokens = 0

    def dump(self) -> None:
        stamp = time.time()
        if self.mode == "stat":
            count = self.rng.integers(0, 50, size=(4, L, E)).astype(np.int32)  # buffer_steps = 4
            self.expected = count.astype(np.int64).sum(axis=0)
            torch.save({"rank": 0, "logical_count": torch.from_numpy(count),
                        "average_utilization_rate_over_window": 0.8},
                       self.dump_dir / f"expert_distribution_recorder_{stamp}.pt")
            return
        p2l = p2l_map(self.rng)
        for rank in range(2):
            records = []
            for pass_id in range(3):
                t = int(self.rng.integers(1, 20))
                # Each token picks K distinct logical experts, each served by one of its replicas.
                phys = np.stack([np.stack([[self.rng.choice(np.flatnonzero(p2l[layer] == e))
                                            for e in self.rng.choice(E, K, replace=False)]
                                           for _ in range(t)]) for layer in range(L)])  # [L, t, K]
                logical = p2l[np.arange(L)[:, None, None], phys]
                for layer in range(L):
                    self.expected[layer] += np.bincount(logical[layer].ravel(), minlength=E)
                self.tokens += t
                if self.mode == "per_pass":
                    count = np.zeros((L, P), np.int64)
                    for layer in range(L):
                        count[layer] = np.bincount(phys[layer].ravel(), minlength=P)
                    records.append({"forward_pass_id": pass_id, "rank": rank, "gatherer_key": "primary",
                                    "global_physical_count": torch.from_numpy(count)})
                else:
                    ids = np.full((L, t, 8), -1, np.int32)  # _TOP_K_NUM = 8, unused columns -1
                    ids[:, :, :K] = phys
                    records.append({"forward_pass_id": pass_id, "rank": rank, "gatherer_key": "primary",
                                    "input_ids": list(range(t)), "positions": list(range(t)),
                                    "extend_seq_lens": [t], "forward_mode": 1 if pass_id == 0 else 2,
                                    "topk_ids_of_layer": torch.from_numpy(ids), "misc_objects": []})
            torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)},
                       self.dump_dir / f"expert_distribution_recorder_{stamp}_{rank}.pt")


@pytest.fixture
def server(tmp_path):
    started = []

    def start(mode: str, **kwargs) -> tuple[str, StandIn]:
        stand_in = StandIn(mode, tmp_path, **kwargs)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                name = self.path.strip("/")
                stand_in.calls.append(name)
                if stand_in.fail_with:
                    self.send_response(stand_in.fail_with)
                    self.end_headers()
                    self.wfile.write(b"Please set ServerArgs.expert_distribution_recorder_mode to use this.\n")
                    return
                text = {"start_expert_distribution_record": "Start recording the expert distribution.\n",
                        "stop_expert_distribution_record": "Stop recording the expert distribution.\n",
                        "dump_expert_distribution_record": "Dump expert distribution record.\n"}.get(name)
                if text is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                if name.startswith("dump") and stand_in.write:
                    stand_in.dump()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(text.encode())

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}", stand_in

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("mode", ["stat", "per_pass", "per_token"])
def test_driver_imports_the_new_dump(server, tmp_path, mode):
    # An older dump in the directory must be ignored.
    torch.save({"rank": 0, "logical_count": torch.ones(1, L, E, dtype=torch.int32)},
               tmp_path / "expert_distribution_recorder_1.pt")
    url, stand_in = server(mode)
    routing = profile_sglang(url, 0.05, tmp_path, model=MODEL)
    assert stand_in.calls == ["start_expert_distribution_record", "stop_expert_distribution_record",
                              "dump_expert_distribution_record"]
    assert (routing.stats.load == stand_in.expected).all()
    if mode != "stat":
        assert routing.stats.num_tokens == stand_in.tokens
        assert (routing.stats.load.sum(axis=1) == stand_in.tokens * K).all()


def test_cli_drives_the_server_and_writes_stats(server, tmp_path, capsys):
    url, stand_in = server("per_token")
    out = tmp_path / "s.npz"
    code = main(["profile", "--sglang", url, "--duration", "0.05", "--dump-dir", str(tmp_path),
                 "--model", "mixtral-8x7b", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    stats = read_stats_npz(out)
    assert stats.model.name == "mixtral-8x7b" and (stats.load == stand_in.expected).all()
    assert (stats.load.sum(axis=1) == stats.num_tokens * K).all()


def test_recorder_mode_off_is_a_clean_error(server, tmp_path):
    url, _ = server("stat", fail_with=400)
    with pytest.raises(InvalidInputError, match="HTTP 400 .*recorder_mode") as exc:
        profile_sglang(url, 0, tmp_path, model=MODEL)
    assert exc.value.source == url


def test_missing_dump_names_the_directory(server, tmp_path):
    url, _ = server("stat", write=False)
    with pytest.raises(InvalidInputError, match="SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR") as exc:
        profile_sglang(url, 0, tmp_path, model=MODEL, wait_s=0.2)
    assert exc.value.source == str(tmp_path)


def test_unreachable_server_exits_2(tmp_path, capsys):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["profile", "--sglang", f"http://127.0.0.1:{port}", "--duration", "0", "--dump-dir",
                 str(tmp_path), "-o", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the server" in err and len(err.strip().splitlines()) == 1
