"""Topology as a graph and as a matrix (issue 17 part 3): the preset graphs' path bandwidths, the
NVLink domains found in a matrix, ``--topology FILE`` (read, checked, exit 2 on bad input), the
bandwidth-weighted traffic metric, and a two-level matrix reproducing the two-level figures."""

from __future__ import annotations

import json
from dataclasses import replace

import networkx as nx
import numpy as np
import pytest
from cli_helpers import one_line_exit2, run

from placer.io.topology import read_bandwidth_matrix, read_topology
from placer.metrics import dispatch_traffic, evaluate
from placer.presets import get_model, make_topology
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace
from placer.types import Placement, Topology
from placer.types.links import domains_of, path_bandwidth, tier_gbps, two_level_matrix


def write_csv(path, m) -> str:
    path.write_text("# GB/s between ranks\n" + "\n".join(",".join(f"{v:g}" for v in row) for row in m) + "\n")
    return str(path)


def rack_matrix() -> np.ndarray:
    """4 nodes of 4 GPUs in 2 racks: NVLink 370 in a node, 48.5 across nodes of a rack, 20 across racks."""
    g = 16
    node, rack = np.arange(g) // 4, np.arange(g) // 8
    m = np.where(rack[:, None] == rack[None, :], 48.5, 20.0)
    m = np.where(node[:, None] == node[None, :], 370.0, m)
    np.fill_diagonal(m, 0.0)
    return m


# -- graphs and domains ------------------------------------------------------------------------

@pytest.mark.parametrize("nodes,per_node", [(1, 8), (2, 4), (4, 8), (3, 1)])
def test_preset_graph_paths_are_the_two_level_matrix(nodes, per_node):
    t = make_topology("h100", nodes=nodes, gpus_per_node=per_node)
    g = t.graph()
    assert sorted(n for n in g.nodes if isinstance(n, int)) == list(range(t.num_gpus))
    assert all(g.nodes[r]["node"] == r // per_node for r in range(t.num_gpus))
    np.testing.assert_array_equal(path_bandwidth(g, t.num_gpus), t.bandwidth_matrix())
    np.testing.assert_array_equal(t.bandwidth_matrix(), two_level_matrix(nodes, per_node, 370.0, 48.5))


def test_widest_path_takes_the_bottleneck_of_the_best_route():
    """A hand-built graph: ranks 0-1 joined directly at 10 GB/s and through a switch at 50 and 40."""
    g = nx.Graph()
    g.add_edge(0, 1, gbps=10.0)
    g.add_edge(0, "sw", gbps=50.0)
    g.add_edge("sw", 1, gbps=40.0)
    g.add_edge(1, 2, gbps=5.0)
    bw = path_bandwidth(g, 3)
    assert bw[0, 1] == bw[1, 0] == 40.0
    assert bw[0, 2] == bw[2, 1] == 5.0
    assert np.isinf(bw[1, 1])


def test_gb200_nvl72_preset_is_one_nvlink_domain_of_72():
    t = make_topology("gb200-nvl72", gpus=72)
    assert (t.num_nodes, t.gpus_per_node, t.nvlink_gbps) == (1, 72, 726.0)
    assert (make_topology("gb200-nvl72", gpus=144).num_nodes, make_topology("h200", gpus=16).gpus_per_node) == (2, 8)
    assert t.graph().number_of_edges() == 72  # every GPU on the one switch, no fabric
    assert np.all(t.bandwidth_matrix()[~np.eye(72, dtype=bool)] == 726.0)


def test_domains_found_from_bandwidths():
    assert domains_of(two_level_matrix(4, 8, 370.0, 48.5)) == (4, 8)
    assert domains_of(rack_matrix()) == (4, 4)  # the widest gap is NVLink against the NICs, not the racks
    assert domains_of(np.full((6, 6), 100.0)) == (1, 6)
    rng = np.random.default_rng(0)
    noisy = two_level_matrix(2, 4, 370.0, 48.5) * rng.uniform(0.95, 1.05, (8, 8))
    noisy = np.minimum(noisy, noisy.T)
    assert domains_of(noisy) == (2, 4)
    interleaved = two_level_matrix(2, 4, 370.0, 48.5)[np.ix_([0, 4, 1, 5, 2, 6, 3, 7], [0, 4, 1, 5, 2, 6, 3, 7])]
    assert isinstance(domains_of(interleaved), str)
    assert tier_gbps(two_level_matrix(2, 4, 370.0, 48.5), 4) == (370.0, 48.5)


# -- reading --topology FILE -------------------------------------------------------------------

def test_csv_and_json_read_the_same_matrix(tmp_path):
    m = rack_matrix()
    csv = write_csv(tmp_path / "m.csv", m)
    (tmp_path / "a.json").write_text(json.dumps(m.tolist()))
    (tmp_path / "b.json").write_text(json.dumps({"gbps": m.tolist()}))
    for path in (csv, tmp_path / "a.json", tmp_path / "b.json"):
        np.testing.assert_array_equal(read_bandwidth_matrix(path), m)
    t = read_topology(csv, cluster="h200", gpus=16)
    assert (t.num_nodes, t.gpus_per_node, t.hbm_gbps) == (4, 4, 4800.0)
    assert t.nvlink_gbps == 370.0 and 20.0 < t.nic_gbps < 48.5  # the cross-node tier's harmonic mean
    bw = t.bandwidth_matrix()
    assert bw[0, 4] == 48.5 and bw[0, 8] == 20.0 and np.isinf(bw[3, 3])


BAD_MATRICES = [
    ("empty.csv", "", "file is empty"),
    ("blank.csv", "\n \n", "empty topology file"),
    ("ragged.csv", "0,1\n1\n", "not a square matrix"),
    ("word.csv", "0,x\nx,0\n", "every entry must be a number"),
    ("neg.csv", "0,-1\n-1,0\n", "entry [0, 1] is -1.0"),
    ("nan.csv", "0,nan\nnan,0\n", "positive finite"),
    ("asym.csv", "0,10\n20,0\n", "not symmetric: [0, 1] is 10 GB/s but [1, 0] is 20"),
    ("bad.json", "[[0, 1], [1, 0]", "not valid JSON"),
    ("obj.json", '{"bandwidth": [[0]]}', 'expected a JSON list of rows'),
]


@pytest.mark.parametrize("name,text,needle", BAD_MATRICES)
def test_bad_matrix_exits_2_naming_the_problem(tmp_path, capsys, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    line = one_line_exit2(capsys, "solve", "--model", "mixtral-8x7b", "--topology", path, "-o", tmp_path / "p.json",
                          needle=needle)
    assert str(path) in line


def test_matrix_size_and_domains_must_fit(tmp_path, capsys):
    path = write_csv(tmp_path / "m.csv", rack_matrix())
    one_line_exit2(capsys, "solve", "--model", "mixtral-8x7b", "--topology", path, "--gpus", 8, "-o",
                   tmp_path / "p.json", needle="a 16 x 16 matrix, but --gpus is 8")
    one_line_exit2(capsys, "solve", "--model", "mixtral-8x7b", "--topology", path, "--nodes", 2, "-o",
                   tmp_path / "p.json", needle="4 NVLink domain(s) of 4 GPUs, but --nodes is 2")
    order = [0, 4, 1, 5, 2, 6, 3, 7]
    mixed = write_csv(tmp_path / "x.csv", two_level_matrix(2, 4, 370.0, 48.5)[np.ix_(order, order)])
    one_line_exit2(capsys, "solve", "--model", "mixtral-8x7b", "--topology", mixed, "-o", tmp_path / "p.json",
                   needle="equal blocks of consecutive ranks")


# -- bandwidth-weighted traffic ----------------------------------------------------------------

def _case(num_nodes=2, per_node=4, redundant=8, tokens=600, seed=3):
    model = get_model("mixtral-8x7b")
    trace = synthesize_trace(model, tokens, seed=seed)
    topology = make_topology("h100", nodes=num_nodes, gpus_per_node=per_node)
    rng = np.random.default_rng(seed)
    slots = model.num_experts + redundant
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(model.num_experts),
                                                    rng.integers(0, model.num_experts, redundant)]))
                    for _ in range(model.num_moe_layers)])
    return model, trace, topology, Placement(p2l, slots // topology.num_gpus, model.num_experts)


def test_two_level_link_time_is_the_tiers_bytes_over_their_bandwidths():
    model, trace, topology, placement = _case()
    d = dispatch_traffic(placement, topology, model, trace)
    tb = model.token_bytes
    want = (d["nvlink_bytes_per_token_layer"] / (topology.nvlink_gbps * 1e9)
            + d["rdma_bytes_per_token_layer"] / (topology.nic_gbps * 1e9))
    assert d["link_time_per_token_layer_s"] == pytest.approx(want, rel=1e-12)
    assert tb > 0


def test_link_time_costs_each_send_by_its_pair():
    """Slowing the links between two nodes raises the link time by exactly those sends' extra seconds."""
    model, trace, _, placement = _case(num_nodes=4, per_node=2)
    base = make_topology("h100", nodes=4, gpus_per_node=2)
    m = base.bandwidth_matrix()
    np.fill_diagonal(m, 0)
    slow = m.copy()
    slow[np.ix_([0, 1], [6, 7])] = slow[np.ix_([6, 7], [0, 1])] = 10.0
    fast_t = dispatch_traffic(placement, replace(base, bandwidth_gbps=tuple(map(tuple, m))), model, trace)
    slow_t = dispatch_traffic(placement, replace(base, bandwidth_gbps=tuple(map(tuple, slow))), model, trace)
    assert fast_t["link_time_per_token_layer_s"] == pytest.approx(
        dispatch_traffic(placement, base, model, trace)["link_time_per_token_layer_s"], rel=1e-12)
    assert slow_t["link_time_per_token_layer_s"] > fast_t["link_time_per_token_layer_s"]
    # every other metric is the same: only the costing changed
    assert {k: v for k, v in slow_t.items() if k not in ("link_time_per_token_layer_s", "per_layer", "pair_sends")} == \
        {k: v for k, v in fast_t.items() if k not in ("link_time_per_token_layer_s", "per_layer", "pair_sends")}


def test_two_level_matrix_file_reproduces_the_two_level_figures(tmp_path):
    """The same cluster given as flags and as its matrix in a file: identical metrics, on a
    trace and on statistics."""
    model, trace, topology, placement = _case()
    path = write_csv(tmp_path / "m.csv", np.where(np.isinf(topology.bandwidth_matrix()), 0,
                                                  topology.bandwidth_matrix()))
    from_file = read_topology(path, cluster="h100")
    assert (from_file.num_nodes, from_file.gpus_per_node, from_file.nvlink_gbps, from_file.nic_gbps) == \
        (topology.num_nodes, topology.gpus_per_node, topology.nvlink_gbps, topology.nic_gbps)
    for data in (trace, compute_stats(trace)):
        a, b = evaluate(placement, topology, model, data), evaluate(placement, from_file, model, data)
        for key in a:
            if key in ("cluster", "per_layer"):
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-12) if isinstance(a[key], float) else a[key] == b[key], key


def test_solve_with_a_two_level_matrix_file_writes_the_same_placement(tmp_path, capsys):
    model = get_model("mixtral-8x7b")
    trace_path = tmp_path / "t.npz"
    from placer.io.native import write_trace_npz
    write_trace_npz(str(trace_path), synthesize_trace(model, 400, seed=1))
    topology = make_topology("h100", nodes=2, gpus_per_node=2)
    matrix = write_csv(tmp_path / "m.csv", np.where(np.isinf(topology.bandwidth_matrix()), 0,
                                                    topology.bandwidth_matrix()))
    outs = []
    for flags in (["--gpus", 4, "--nodes", 2], ["--topology", matrix]):
        out = tmp_path / f"p{len(outs)}.json"
        code, stdout, err = run(capsys, "solve", trace_path, *flags, "--redundant", 4, "--method", "eplb", "-o", out,
                                "--quiet", "--json")
        assert code == 0, err
        outs.append(json.loads(out.read_text()))
    assert outs[0]["physical_to_logical_map"] == outs[1]["physical_to_logical_map"]
    assert outs[1]["topology"]["bandwidth_gbps"][0][2] == 48.5
    for key in ("load_max_over_mean_median", "inter_node_nodes_per_token_layer", "link_time_per_token_layer_s"):
        assert outs[0]["metrics"][key] == pytest.approx(outs[1]["metrics"][key], rel=1e-12)
    code, stdout, err = run(capsys, "evaluate", tmp_path / "p1.json", trace_path, "--cluster", "h100", "--json")
    assert code == 0, err
    assert json.loads(stdout)["cluster"] == "h100:m.csv"


def test_topology_round_trips_through_the_placement_file():
    m = rack_matrix()
    topo = replace(make_topology("h100", nodes=4, gpus_per_node=4), bandwidth_gbps=tuple(map(tuple, m)))
    assert Topology.from_dict(json.loads(json.dumps(topo.to_dict()))) == topo
    assert "bandwidth_gbps" not in make_topology("h100", gpus=8).to_dict()
