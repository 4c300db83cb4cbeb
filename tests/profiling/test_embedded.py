"""The shipped embedded model: files, architecture, tokenizer, and its routing on held-out text."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from placer.profiling import embedded

pytestmark = pytest.mark.timeout(120)
# The weights are in git: a missing file is a broken install, not a reason to skip.


def test_embedded_weights_are_shipped():
    assert embedded.WEIGHTS_FILE.is_file(), f"{embedded.WEIGHTS_FILE} is missing from the package"


def test_byte_tokenizer_round_trips_text():
    tok = embedded.ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    ids = tok.encode(text)
    assert ids[0] == embedded.BOS and max(ids[1:]) < 256 and len(ids) == len(text.encode()) + 1
    assert tok.decode(ids) == text
    assert tok.decode([embedded.PAD, 104, 105, embedded.EOS]) == "hi"


def test_shipped_files_are_a_small_mixtral_with_a_byte_vocabulary():
    config = json.loads(embedded.CONFIG_FILE.read_text())
    assert config["model_type"] == "mixtral" and config["vocab_size"] == embedded.VOCAB_SIZE
    assert 8 <= config["num_local_experts"] <= 16 and config["num_experts_per_tok"] == 2
    assert config["router_aux_loss_coef"] > 0
    size = embedded.WEIGHTS_FILE.stat().st_size
    assert 1e6 < size < 8e6


def test_training_record_says_accepted_by_the_stated_criteria():
    record = embedded.training_record()
    fig = record["figures"]
    assert fig["accepted"] is True
    assert all(1.1 <= s <= 3.0 for s in fig["load_max_over_mean_per_layer"])
    assert fig["routing_figures"]["affinity"] >= fig["routing_figures"]["marginal"] + 0.10
    assert record["weights_bytes"] == embedded.WEIGHTS_FILE.stat().st_size
    assert record["files"] and all(f in dict(embedded.TRAIN_FILES) for f in record["files"])


def test_find_files_reports_missing_and_changed_files(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_bytes(b"x = 1\n")
    (tmp_path / "b.py").write_bytes(b"y = 2\n")
    monkeypatch.setattr(embedded, "stdlib_dir", lambda: tmp_path)
    pinned = (("a.py", hashlib.sha256(b"x = 1\n").hexdigest()), ("b.py", "0" * 64), ("c.py", "0" * 64))
    found, notes = embedded.find_files(pinned)
    assert [name for name, _ in found] == ["a.py", "b.py"]
    assert notes == ["b.py: sha256 differs from the pinned one", "c.py: missing"]


def test_heldout_prompts_are_line_aligned_windows():
    prompts = embedded.heldout_prompts(max_bytes=300, limit=40)
    assert len(prompts) == 40
    assert all(p.endswith("\n") for p in prompts[:-1])
    assert sum(len(p.encode()) <= 300 for p in prompts) >= 38  # a single line longer than 300 stays whole


def test_embedded_model_routes_held_out_text_with_structure():
    pytest.importorskip("transformers")
    from placer.profiling.capture import model_spec
    from placer.profiling.hf import LoadedModel, capture_chunks
    from placer.profiling.summary import summarize
    from placer.stats import StatsBuilder

    model = embedded.load_embedded()
    spec = model_spec(model, embedded.NAME)
    assert spec.num_moe_layers == model.config.num_hidden_layers and spec.top_k == 2
    loaded = LoadedModel(model, embedded.ByteTokenizer(), spec, "embedded")
    builder = StatsBuilder(spec.num_moe_layers, spec.num_experts, spec.top_k, model=spec)
    for chunk in capture_chunks(loaded, embedded.heldout_prompts(max_bytes=511, limit=24), batch_size=8):
        builder.update(chunk)
    stats = builder.result("all")
    assert (stats.load.sum(axis=1) == stats.num_tokens * 2).all()
    s = summarize(stats)
    assert s["worst_max_over_mean"] < 3.5
    assert s["mean"]["affinity"] > s["mean"]["marginal"] + 0.05
    assert np.isfinite(s["median"]["max_over_mean"])
