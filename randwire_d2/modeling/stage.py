"""A RandWire stage: one DAG executed node by node (the reference executor)."""
from typing import Dict, List

import torch
from torch import nn

from ..graphs import GraphSpec
from .fast_stage import DEFAULT_EXECUTOR, EXECUTORS, FORWARDS
from .node import NodeOp


class RandWireStage(nn.Module):
    """Runs the nodes of ``graph`` in topological order.

    The unique input node feeds every in-degree-0 node (stride 2, channel change);
    the unique output node is the unweighted mean of the out-degree-0 nodes.
    ``executor``: "reference" runs node by node (this module's loop); "fused" and "batched"
    are the faster alternatives of :mod:`.fast_stage`. Same parameters and results.
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
    ):
        super().__init__()
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}.")
        self.executor = executor
        if not isinstance(graph, GraphSpec):
            raise TypeError(f"graph must be a GraphSpec, got {type(graph).__name__}.")
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
        self._output_nodes = frozenset(graph.output_nodes)
        # Free each node's output right after its last consumer has run.
        last_use = {}
        for v in graph.topological_order:
            for u in graph.predecessors[v]:
                last_use[u] = v
        self._free_after: Dict[int, List[int]] = {}
        for u, v in last_use.items():
            self._free_after.setdefault(v, []).append(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.executor != "reference":
            return FORWARDS[self.executor](self, x)
        live: Dict[int, torch.Tensor] = {}
        total = None
        for v in self.graph.topological_order:
            preds = self.graph.predecessors[v]
            out = self.nodes[v]([live[u] for u in preds] if preds else [x])
            for u in self._free_after.get(v, ()):
                del live[u]
            if v in self._output_nodes:
                total = out if total is None else total + out
            else:
                live[v] = out
        return total / len(self._output_nodes)

    def extra_repr(self) -> str:
        g = self.graph
        return (
            f"{g.generator}{g.param_dict} seed={g.seed}: {g.num_nodes} nodes, {len(g.edges)} edges, "
            f"{len(g.input_nodes)} inputs, {len(g.output_nodes)} outputs, executor={self.executor}"
        )
