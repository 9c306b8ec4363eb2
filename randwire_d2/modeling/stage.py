"""A RandWire stage: one DAG run node by node.

``executor="reference"`` is the executable spec of the paper (this module's loop);
``"lean"`` (the default, :mod:`.lean`) computes the same with far fewer activations kept
for backward and bytes moved. Both use the same per-node ``NodeOp`` parameters, so
state_dicts and checkpoints are interchangeable.
"""
from typing import Dict, FrozenSet, List

import torch
from torch import nn

from ..graphs import GraphSpec
from .lean import lean_forward
from .node import NodeOp

EXECUTORS = ("reference", "lean")
DEFAULT_EXECUTOR = "lean"  # benchmarks/README.md: saved and moved bytes vs ResNet-50
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
    if recompute and executor != "lean":
        raise ValueError(f"recompute=True needs the 'lean' executor, got {executor!r}.")


class RandWireStage(nn.Module):
    """Runs the nodes of ``graph`` in topological order.

    The unique input node feeds every in-degree-0 node (stride 2, channel change);
    the unique output node is the unweighted mean of the out-degree-0 nodes.
    ``recompute`` (lean only): keep only node outputs for backward, recompute the rest.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.executor == "lean" and not _compiling():
            return lean_forward(self, x)
        live: Dict[int, torch.Tensor] = {}
        total = None
        for v in self.graph.topological_order:
            preds = self.graph.predecessors[v]
            out = self.nodes[v]([live[u] for u in preds] if preds else [x])
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
