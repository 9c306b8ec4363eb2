"""Random graph generators, DAG conversion and the serialisable spec."""
import json
import random
import statistics
import subprocess
import sys

import networkx as nx
import pytest

from randwire_d2.graphs import GraphSpec, generate_graph, stage_seed
from randwire_d2.modeling.network import build_graph_specs

PAPER = {"WS": {"k": 4, "p": 0.75}, "ER": {"p": 0.2}, "BA": {"m": 5}}

# Hashes of the paper's settings, N=32, seed=1234, with networkx 3.6. If networkx
# changes its random streams this fails: models then must be rebuilt from stored specs.
PINNED = {
    "WS": "429a7d897a6911ac3e096b5bdeb3ba707df590a68fc0d374e54ba45852ec3931",
    "ER": "edd5ae99c05bb8102b30f018af5f015cba6e7941a510f4228a25d5524da511f8",
    "BA": "cd0b2849fcc850fecd570b70011a0177edd4b0f2d4a00ae96cdf16c60bf1934b",  # M-node start (spec v2)
}


@pytest.mark.parametrize("gen", sorted(PAPER))
def test_pinned_hash(gen):
    spec = generate_graph(gen, 32, 1234, **PAPER[gen])
    assert spec.content_hash == PINNED[gen], (
        f"networkx {nx.__version__} produced a different {gen} graph for a fixed seed: its random "
        "stream changed. Stored specs (checkpoints, GRAPHS_FILE) still rebuild old models exactly."
    )


def test_same_seed_same_edges_in_fresh_process():
    code = (
        "import json; from randwire_d2.graphs import generate_graph as g;"
        "print(json.dumps([list(map(list, g(n, 32, 7, **kw).edges)) for n, kw in "
        f"{sorted(PAPER.items())!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = [[list(e) for e in generate_graph(n, 32, 7, **kw).edges] for n, kw in sorted(PAPER.items())]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_stages_get_different_graphs():
    for regime in ("small", "regular"):
        specs = build_graph_specs(regime, 32, "WS", PAPER["WS"], seed=0)
        hashes = [s.content_hash for s in specs.values()]
        assert len(set(hashes)) == len(hashes)
        assert len({s.seed for s in specs.values()}) == len(specs)
    assert stage_seed(0, "res3") != stage_seed(1, "res3")


def _networkx2_ba_edges(n, m, seed):
    """BA as networkx 2.x (and the paper) grew it, written out: M nodes with no edges,
    node M joined to all of them, then preferential attachment over the degree list."""
    rng = random.Random(seed)
    edges, repeated, targets = set(), [], list(range(m))
    for source in range(m, n):
        edges.update((t, source) for t in targets)
        repeated.extend(targets)
        repeated.extend([source] * m)
        chosen = set()
        while len(chosen) < m:
            chosen.add(rng.choice(repeated))
        targets = chosen
    return edges


@pytest.mark.parametrize("m", [1, 2, 5])
def test_ba_starts_from_m_nodes_over_seeds(m):
    """BA(M) stages have exactly M input nodes (0..M-1), node M is fed by all of them and
    every later node by M earlier ones. networkx 3's default star start gives one input."""
    for n in (16, 32):
        for seed in range(40):
            spec = generate_graph("BA", n, seed, m=m)
            assert spec.input_nodes == tuple(range(m)), (n, seed)
            assert spec.predecessors[m] == tuple(range(m)), (n, seed)
            assert all(len(spec.predecessors[v]) == m for v in range(m, n)), (n, seed)
            assert len(spec.edges) == m * (n - m)
            if seed < 5:
                assert set(spec.edges) == _networkx2_ba_edges(n, m, seed), (n, seed)


def test_generators_match_paper_statistics_over_seeds():
    """Edge counts the paper's parameters imply: WS keeps N*K/2 edges and stays connected
    (rewiring moves edges); ER(P) averages P*N(N-1)/2 with a seed-dependent spread."""
    er_edges = []
    for seed in range(60):
        ws = generate_graph("WS", 32, seed, k=4, p=0.75)
        assert len(ws.edges) == 32 * 4 // 2
        assert nx.is_connected(ws.to_networkx().to_undirected())
        er_edges.append(len(generate_graph("ER", 32, seed, p=0.2).edges))
    assert abs(statistics.mean(er_edges) / (0.2 * 32 * 31 / 2) - 1) < 0.05
    assert statistics.stdev(er_edges) > 3  # ~ sqrt(496 * 0.2 * 0.8) = 8.9


def test_paper_node_order():
    # WS: ring order, so most edges join ring neighbours (i, i+1) and (i, i+2)
    ws = generate_graph("WS", 32, 0, k=4, p=0.0)
    assert set(ws.edges) == {tuple(sorted((i, (i + d) % 32))) for i in range(32) for d in (1, 2)}
    # ER: nodes are randomly permuted, but the undirected graph is networkx's
    er = generate_graph("ER", 32, 3, p=0.2)
    ref = nx.erdos_renyi_graph(32, 0.2, seed=3)
    assert nx.is_isomorphic(er.to_networkx().to_undirected(), ref)
    assert set(er.edges) != {tuple(sorted(e)) for e in ref.edges()}  # but not its labels


def test_json_roundtrip_and_corruption():
    spec = generate_graph("WS", 16, 3, k=4, p=0.75)
    again = GraphSpec.from_json(spec.to_json())
    assert again == spec and again.content_hash == spec.content_hash
    assert again.param_dict == {"k": 4, "p": 0.75} and again.seed == 3
    data = spec.to_dict()
    data["edges"] = data["edges"][1:]
    with pytest.raises(ValueError, match="content_hash"):
        GraphSpec.from_dict(data)
    with pytest.raises(ValueError, match="low index -> high index"):
        GraphSpec(num_nodes=3, edges=((2, 1),))


@pytest.mark.parametrize(
    "gen, n, params, match",
    [
        ("XX", 32, {}, "Unknown graph generator"),
        ("WS", 1, {"k": 4, "p": 0.5}, "num_nodes"),
        ("WS", 32, {"k": 3, "p": 0.5}, "K must be an even"),
        ("WS", 32, {"k": 32, "p": 0.5}, "K must be an even"),
        ("WS", 32, {"k": 4, "p": 1.5}, "P must be a probability"),
        ("ER", 32, {"p": -0.1}, "P must be a probability"),
        ("ER", 32, {"p": float("nan")}, "P must be a probability"),
        ("BA", 32, {"m": 0}, r"M must be an integer in \[1, N\)"),
        ("BA", 32, {"m": 32}, r"M must be an integer in \[1, N\)"),
        ("BA", 32, {"m": 2.5}, r"M must be an integer in \[1, N\)"),
        ("ER", 32, {"p": 0.2, "k": 4}, "unknown"),
        ("WS", 32, {"k": 4}, "missing"),
    ],
)
def test_bad_parameters_raise_naming_them(gen, n, params, match):
    with pytest.raises(ValueError, match=match):
        generate_graph(gen, n, 0, **params)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        generate_graph("ER", 8, -1, p=0.5)
