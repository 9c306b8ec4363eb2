"""Seeded random graphs made into the paper's DAGs, stored as plain data.

A stage is built from a :class:`GraphSpec` (node count + edge list), never from a
seed alone: networkx may change its random streams between versions, so the spec
actually used travels with the model and its checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Mapping, Tuple

import networkx as nx
import numpy as np

__all__ = [
    "GENERATORS",
    "GraphSpec",
    "generate_graph",
    "stage_seed",
    "validate_generator_params",
]

# Parameter names of each generator, in the paper's notation (lower case).
GENERATORS: Dict[str, Tuple[str, ...]] = {"ER": ("p",), "BA": ("m",), "WS": ("k", "p")}
MIN_NODES = 2
# Version of the generating process a spec records. 2: BA starts from M unconnected
# nodes, as the paper does (1 used networkx 3's star start: one input node per stage).
# Specs of every version rebuild their own network exactly; only the graph a given
# BA seed yields changed.
SPEC_VERSION = 2
LEGACY_BA_NOTE = (
    "BA specs of version 1 (randwire_d2 before BA was fixed to start from M nodes) came from "
    "networkx 3's star start, so the same BA seed now generates another graph"
)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def canonical_generator(generator: str) -> str:
    if not isinstance(generator, str) or generator.upper() not in GENERATORS:
        raise ValueError(
            f"Unknown graph generator {generator!r}: allowed are {', '.join(GENERATORS)}."
        )
    return generator.upper()


def validate_generator_params(generator: str, num_nodes: int, params: Mapping[str, float]) -> Dict[str, float]:
    """Check generator parameters; return them normalised (lower-case keys, int K/M).

    Every error names the parameter and its allowed range.
    """
    generator = canonical_generator(generator)
    if not _is_int(num_nodes) or num_nodes < MIN_NODES:
        raise ValueError(f"num_nodes (N) must be an integer >= {MIN_NODES}, got {num_nodes!r}.")
    params = {str(k).lower(): v for k, v in dict(params).items()}
    expected = GENERATORS[generator]
    unknown = sorted(set(params) - set(expected))
    missing = [name for name in expected if name not in params]
    if unknown or missing:
        raise ValueError(
            f"{generator} takes parameters {list(expected)}; "
            + (f"unknown: {unknown}. " if unknown else "")
            + (f"missing: {missing}." if missing else "")
        )
    out: Dict[str, float] = {}
    if "p" in expected:
        p = params["p"]
        if not _is_number(p) or not math.isfinite(float(p)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{generator} parameter P must be a probability in [0, 1], got {p!r}.")
        out["p"] = float(p)
    if generator == "WS":
        k = params["k"]
        if not _is_int(k) or k < 2 or k % 2 or k >= num_nodes:
            raise ValueError(
                f"WS parameter K must be an even integer with 2 <= K < N (N={num_nodes}), got {k!r}."
            )
        out["k"] = int(k)
    if generator == "BA":
        m = params["m"]
        if not _is_int(m) or not 1 <= m < num_nodes:
            raise ValueError(f"BA parameter M must be an integer in [1, N) = [1, {num_nodes}), got {m!r}.")
        out["m"] = int(m)
    return {name: out[name] for name in expected}


def stage_seed(network_seed: int, stage: str) -> int:
    """Each stage gets its own seed; reusing one seed gives every stage the same graph."""
    if not _is_int(network_seed) or network_seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {network_seed!r}.")
    digest = hashlib.sha256(f"randwire:{int(network_seed)}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _ba_start(m: int) -> nx.Graph:
    """BA as the paper (and networkx 2.x) grows it: M nodes with no edges, then node M
    joined to all of them, then preferential attachment.

    networkx 3's default start, a star on M+1 nodes with hub 0, gives the DAG a single
    input node (0 -> 1..M) instead of M. Nodes are added 0..M-1 before the hub M, so
    networkx's degree-ordered attachment list, hence the random stream, is 2.x's.
    """
    graph = nx.empty_graph(m)
    graph.add_edges_from((m, i) for i in range(m))
    return graph


def _undirected_graph(generator: str, n: int, params: Dict[str, float], seed: int) -> nx.Graph:
    if generator == "ER":
        return nx.erdos_renyi_graph(n, params["p"], seed=seed)
    if generator == "BA":
        return nx.barabasi_albert_graph(n, params["m"], seed=seed, initial_graph=_ba_start(params["m"]))
    try:  # the connected variant: a disconnected WS graph has isolated pieces
        return nx.connected_watts_strogatz_graph(n, params["k"], params["p"], tries=1000, seed=seed)
    except nx.NetworkXError as exc:
        raise ValueError(f"WS(K={params['k']}, P={params['p']}) with N={n}: {exc}") from exc


def _node_order(generator: str, n: int, seed: int) -> np.ndarray:
    """Index of each networkx node in the DAG (paper appendix)."""
    if generator == "ER":  # ER has no natural order: a seeded random permutation
        return np.random.default_rng([seed, 1]).permutation(n)
    # BA: initial nodes first, then insertion order; WS: around the ring.
    # networkx already labels nodes 0..n-1 in exactly those orders.
    return np.arange(n)


def generate_graph(generator: str, num_nodes: int, seed: int, **params) -> "GraphSpec":
    """Sample an undirected graph and orient every edge from lower to higher index."""
    generator = canonical_generator(generator)
    params = validate_generator_params(generator, num_nodes, params)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    graph = _undirected_graph(generator, int(num_nodes), params, int(seed))
    order = _node_order(generator, int(num_nodes), int(seed))
    edges = sorted(
        tuple(sorted((int(order[u]), int(order[v])))) for u, v in graph.edges() if u != v
    )
    return GraphSpec(
        num_nodes=int(num_nodes),
        edges=tuple(edges),
        generator=generator,
        params=tuple(params.items()),
        seed=int(seed),
    )


@dataclass(frozen=True)
class GraphSpec:
    """A DAG whose edges all point from a lower to a higher node index.

    ``generator``, ``params`` and ``seed`` record where the graph came from; the
    network is built from ``num_nodes`` and ``edges`` alone.
    """

    num_nodes: int
    edges: Tuple[Tuple[int, int], ...]
    generator: str = "custom"
    params: Tuple[Tuple[str, float], ...] = ()
    seed: int = -1
    version: int = field(default=SPEC_VERSION, compare=False)  # see SPEC_VERSION

    def __post_init__(self):
        n = self.num_nodes
        if not _is_int(n) or n < 1:
            raise ValueError(f"GraphSpec.num_nodes must be a positive integer, got {n!r}.")
        edges = tuple(tuple(int(x) for x in e) for e in self.edges)
        for edge in edges:
            if len(edge) != 2 or not 0 <= edge[0] < edge[1] < n:
                raise ValueError(
                    f"GraphSpec edge {edge} is invalid: edges must be (u, v) with 0 <= u < v < {n} "
                    "(the DAG orientation is low index -> high index)."
                )
        if len(set(edges)) != len(edges):
            raise ValueError("GraphSpec has duplicate edges.")
        object.__setattr__(self, "edges", tuple(sorted(edges)))
        object.__setattr__(self, "params", tuple((str(k), v) for k, v in self.params))

    # Derived structure. Low -> high edges make 0..N-1 a topological order.
    @property
    def param_dict(self) -> Dict[str, float]:
        return dict(self.params)

    @property
    def topological_order(self) -> Tuple[int, ...]:
        return tuple(range(self.num_nodes))

    @cached_property
    def predecessors(self) -> Tuple[Tuple[int, ...], ...]:
        preds: List[List[int]] = [[] for _ in range(self.num_nodes)]
        for u, v in self.edges:
            preds[v].append(u)
        return tuple(tuple(p) for p in preds)

    @cached_property
    def successors(self) -> Tuple[Tuple[int, ...], ...]:
        succ: List[List[int]] = [[] for _ in range(self.num_nodes)]
        for u, v in self.edges:
            succ[u].append(v)
        return tuple(tuple(s) for s in succ)

    @property
    def input_nodes(self) -> Tuple[int, ...]:
        """Nodes with no in-edge: fed by the stage's input node."""
        return tuple(i for i, p in enumerate(self.predecessors) if not p)

    @property
    def output_nodes(self) -> Tuple[int, ...]:
        """Nodes with no out-edge: averaged by the stage's output node."""
        return tuple(i for i, s in enumerate(self.successors) if not s)

    @cached_property
    def depths(self) -> Tuple[int, ...]:
        """Longest-path depth of each node from the input node (input nodes: 0)."""
        depth = [0] * self.num_nodes
        for v in self.topological_order:
            for u in self.predecessors[v]:
                depth[v] = max(depth[v], depth[u] + 1)
        return tuple(depth)

    @cached_property
    def content_hash(self) -> str:
        """sha256 of the wiring (node count + edges): equal hash, identical network."""
        payload = json.dumps({"num_nodes": self.num_nodes, "edges": self.edges}, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_networkx(self) -> nx.DiGraph:
        graph = nx.DiGraph()
        graph.add_nodes_from(range(self.num_nodes))
        graph.add_edges_from(self.edges)
        return graph

    # (De)serialisation
    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "num_nodes": self.num_nodes,
            "edges": [list(e) for e in self.edges],
            "generator": self.generator,
            "params": dict(self.params),
            "seed": self.seed,
            "content_hash": self.content_hash,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "GraphSpec":
        try:
            spec = cls(
                num_nodes=int(data["num_nodes"]),
                edges=tuple(tuple(e) for e in data["edges"]),
                generator=str(data.get("generator", "custom")),
                params=tuple(dict(data.get("params", {})).items()),
                seed=int(data.get("seed", -1)),
                version=int(data.get("version", 1)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"Not a graph spec (needs 'num_nodes' and 'edges'): {exc}") from exc
        stored = data.get("content_hash")
        if stored is not None and stored != spec.content_hash:
            raise ValueError("Graph spec is corrupt: its content_hash does not match its edges.")
        return spec

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GraphSpec":
        return cls.from_dict(json.loads(text))


def specs_to_dict(specs: Mapping[str, GraphSpec]) -> Dict[str, dict]:
    return {name: spec.to_dict() for name, spec in specs.items()}


def specs_from_dict(data: Mapping[str, Mapping]) -> Dict[str, GraphSpec]:
    if not isinstance(data, Mapping) or not all(isinstance(d, Mapping) for d in data.values()):
        raise ValueError("Graph specs must be a mapping {stage name: spec dict}.")
    return {str(name): GraphSpec.from_dict(d) for name, d in data.items()}


def describe_differences(expected: Mapping[str, GraphSpec], found: Mapping[str, GraphSpec]) -> List[str]:
    """Human-readable list of stages whose wiring differs."""
    problems = []
    for name in sorted(set(expected) | set(found)):
        a, b = expected.get(name), found.get(name)
        if a is None or b is None:
            problems.append(f"stage {name}: present only in the {'checkpoint' if a is None else 'model'}")
        elif a.content_hash != b.content_hash:
            problems.append(
                f"stage {name}: model has {a.generator}{a.param_dict} seed={a.seed} "
                f"({a.num_nodes} nodes, {len(a.edges)} edges, hash {a.content_hash[:12]}), "
                f"checkpoint has {b.generator}{b.param_dict} seed={b.seed} "
                f"({b.num_nodes} nodes, {len(b.edges)} edges, hash {b.content_hash[:12]})"
                + (f" [{LEGACY_BA_NOTE}]" if b.generator == "BA" and b.version < 2 else "")
            )
    return problems
