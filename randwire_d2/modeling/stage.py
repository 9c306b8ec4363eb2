"""A RandWire stage: one DAG run node by node.

``executor="reference"`` is the executable spec of the paper (this module's loop);
``"lean"`` (:mod:`.lean`) computes the same with far fewer activations kept for backward
and bytes moved; ``"auto"`` (the default) picks per input device: lean on a GPU, where
memory traffic is what a step pays for, the reference on a CPU, which is compute-bound
and runs it faster (benchmarks/README.md, "Executors on CPU"). All use the same per-node
``NodeOp`` parameters, so state_dicts and checkpoints are interchangeable.
"""
from typing import Dict, FrozenSet, List, Optional

import torch
from torch import nn

from ..graphs import GraphSpec
from .lean import BagPlan, lean_forward
from .node import NodeOp, keep_from_uniform

EXECUTORS = ("auto", "reference", "lean")
DEFAULT_EXECUTOR = "auto"
_REMOVED = {"fused": "lean", "batched": "lean"}


def _compiling() -> bool:
    # torch.compile traces the reference ops: inductor fuses what lean fuses by hand, and
    # its partitioner picks what to keep for backward
    return torch.compiler.is_compiling()


def check_executor(executor: str, recompute: bool = False) -> None:
    if executor in _REMOVED:
        raise ValueError(
            f"executor {executor!r} was removed (it kept and moved more bytes than 'lean', "
            f"see benchmarks/README.md): use {_REMOVED[executor]!r} or 'reference'."
        )
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}.")
    if recompute and executor == "reference":
        raise ValueError("recompute=True needs the 'lean' (or 'auto') executor, got 'reference'.")


def resolve_executor(executor: str, recompute: bool, device: torch.device) -> str:
    """The executor a stage runs on ``device``: "auto" is lean on CUDA (and wherever
    ``recompute`` asks for lean's memory), the reference elsewhere (faster on a CPU)."""
    if executor != "auto":
        return executor
    return "lean" if recompute or device.type == "cuda" else "reference"


class RandWireStage(nn.Module):
    """Runs the nodes of ``graph`` in topological order.

    The unique input node feeds every in-degree-0 node (stride 2, channel change);
    the unique output node is the unweighted mean of the out-degree-0 nodes.
    ``recompute`` (lean; "auto" then runs lean everywhere): keep only node outputs for
    backward, recompute the rest.
    """

    def __init__(
        self,
        graph: GraphSpec,
        in_channels: int,
        out_channels: int,
        *,
        norm="BN",
        drop_path: float = 0.0,
        executor: str = DEFAULT_EXECUTOR,
        recompute: bool = False,
    ):
        super().__init__()
        check_executor(executor, recompute)
        if not isinstance(graph, GraphSpec):
            raise TypeError(f"graph must be a GraphSpec, got {type(graph).__name__}.")
        self.executor, self.recompute = executor, bool(recompute)
        self.graph = graph
        self.in_channels, self.out_channels = in_channels, out_channels
        self.nodes = nn.ModuleList(
            NodeOp(
                max(1, len(preds)),
                out_channels if preds else in_channels,
                out_channels,
                stride=1 if preds else 2,
                norm=norm,
                drop_path=drop_path,
            )
            for preds in graph.predecessors
        )
        self.output_node_set: FrozenSet[int] = frozenset(graph.output_nodes)
        # Free each node's output right after its last consumer has run.
        last_use = {}
        for v in graph.topological_order:
            for u in graph.predecessors[v]:
                last_use[u] = v
        self.free_after: Dict[int, List[int]] = {}
        for u, v in last_use.items():
            self.free_after.setdefault(v, []).append(u)
        # the weighted nodes (>1 input): their edges numbered node by node, in topological order
        self.weighted_nodes: List[int] = [v for v in graph.topological_order if len(graph.predecessors[v]) > 1]
        self.edge_counts: List[int] = [len(graph.predecessors[v]) for v in self.weighted_nodes]
        self.bag_plan = BagPlan({v: list(graph.predecessors[v]) for v in self.weighted_nodes})
        self._layout: Dict[str, tuple] = {}  # device -> (valid, positions) for DropPath

    def _drop_layout(self, device):
        """(padding (M, K, 1) bool, positions (E,) long): the edges inside an (M, K) padded grid."""
        key = str(device)
        if key not in self._layout:
            width = max(self.edge_counts)
            pad = torch.tensor([[i >= k for i in range(width)] for k in self.edge_counts], device=device)
            pos = torch.tensor([m * width + i for m, k in enumerate(self.edge_counts) for i in range(k)],
                               device=device)
            self._layout[key] = (pad[:, :, None], pos)
        return self._layout[key]

    def flat_aggregation_weights(self, batch: int, device) -> Optional[torch.Tensor]:
        """The aggregation weights of every weighted node in one go: (E,), or (E, batch) with
        DropPath in training, rows in ``weighted_nodes`` edge order (None if there are none).

        One sigmoid and one mask draw per stage instead of per node: DropPath drops each edge
        with probability ``rate`` per sample, a sample that lost all of a node's edges keeps
        one (``keep_from_uniform``), and kept weights are scaled by 1/(1-rate).
        """
        if not self.weighted_nodes:
            return None
        nodes = [self.nodes[v] for v in self.weighted_nodes]
        sig = torch.sigmoid(torch.cat([n.agg_weight for n in nodes]))
        rate = nodes[0].drop_path
        if not (nodes[0].training and rate > 0.0):
            return sig
        if any(n.drop_path != rate for n in nodes):
            raise ValueError("RandWireStage: every node of a stage needs the same drop_path rate.")
        pad, pos = self._drop_layout(device)
        u = torch.rand(len(nodes), pad.shape[1], batch, device=device).masked_fill_(pad, -1.0)
        keep = keep_from_uniform(u, rate).reshape(-1, batch)[pos]
        return keep * (sig * (1.0 / (1.0 - rate)))[:, None]

    def aggregation_weights(self, batch: int, device) -> Dict[int, torch.Tensor]:
        """{weighted node: its weights, (k,) or (k, batch)} (``flat_aggregation_weights``)."""
        flat = self.flat_aggregation_weights(batch, device)
        if flat is None:
            return {}
        return dict(zip(self.weighted_nodes, flat.split(self.edge_counts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_executor(self.executor, self.recompute, x.device) == "lean" and not _compiling():
            return lean_forward(self, x)
        live: Dict[int, torch.Tensor] = {}
        total = None
        weights = self.aggregation_weights(x.shape[0], x.device)
        for v in self.graph.topological_order:
            preds = self.graph.predecessors[v]
            out = self.nodes[v]([live[u] for u in preds] if preds else [x], weights.get(v))
            for u in self.free_after.get(v, ()):
                del live[u]
            if v in self.output_node_set:
                total = out if total is None else total + out
            else:
                live[v] = out
        return total / len(self.output_node_set)

    def extra_repr(self) -> str:
        g = self.graph
        return (
            f"{g.generator}{g.param_dict} seed={g.seed}: {g.num_nodes} nodes, {len(g.edges)} edges, "
            f"{len(g.input_nodes)} inputs, {len(g.output_nodes)} outputs, executor={self.executor}"
            + (", recompute" if self.recompute else "")
        )


def set_executor(module: nn.Module, executor: str, recompute: bool = False) -> nn.Module:
    """Switch every RandWireStage inside ``module`` to ``executor`` (no parameter changes)."""
    check_executor(executor, recompute)
    for m in module.modules():
        if isinstance(m, RandWireStage):
            m.executor, m.recompute = executor, bool(recompute)
    return module
