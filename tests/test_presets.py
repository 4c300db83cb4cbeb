import pytest

from placer.errors import InvalidInputError
from placer.presets import CLUSTERS, MODELS, get_model, make_topology


def test_model_presets_shapes():
    v3 = get_model("deepseek-v3")
    assert (v3.num_hidden_layers, v3.num_moe_layers, v3.num_experts, v3.top_k) == (61, 58, 256, 8)
    assert v3.moe_layer_ids[0] == 3 and (v3.num_groups, v3.topk_groups) == (8, 4)
    mav = get_model("llama-4-maverick")
    assert mav.num_moe_layers == 24 and mav.moe_layer_ids[:2] == (1, 3)
    mix = get_model("Mixtral-8x7B")
    assert mix.expert_weight_bytes == pytest.approx(352.3e6, rel=1e-3)  # 3*4096*14336*2
    assert len(MODELS) == 10


def test_unknown_presets():
    with pytest.raises(InvalidInputError, match="unknown model preset"):
        get_model("gpt-5")
    with pytest.raises(InvalidInputError, match="unknown cluster preset"):
        make_topology("tpu", gpus=4)


@pytest.mark.parametrize("kw, nodes, per_node", [
    (dict(gpus=4), 1, 4),
    (dict(gpus=16), 2, 8),
    (dict(gpus=16, nodes=4), 4, 4),
    (dict(nodes=3), 3, 8),
    (dict(gpus=12, gpus_per_node=6), 2, 6),
    (dict(nodes=2, gpus_per_node=4), 2, 4),
])
def test_cluster_sizes(kw, nodes, per_node):
    t = make_topology("h200", **kw)
    assert (t.num_nodes, t.gpus_per_node) == (nodes, per_node)
    assert t.memory_bytes == 141e9


@pytest.mark.parametrize("kw, match", [
    (dict(gpus=12), "pass --nodes"),
    (dict(gpus=10, nodes=4), "do not split"),
    (dict(gpus=0), "at least 1"),
    (dict(), "give the cluster size"),
    (dict(gpus=8, nodes=2, gpus_per_node=3), "!="),
])
def test_cluster_size_errors(kw, match):
    with pytest.raises(InvalidInputError, match=match):
        make_topology("h100", **kw)


def test_all_clusters_build():
    for name in CLUSTERS:
        assert make_topology(name, gpus=8).num_gpus == 8
