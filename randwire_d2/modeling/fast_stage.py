"""Fast stage executors: alternative forwards of :class:`~randwire_d2.modeling.stage.RandWireStage`.

* ``"fused"`` (the default, fastest measured on CPU): the reference node-by-node loop with
  each node's weighted aggregation as one kernel (stack + tensordot) instead of a chain of
  multiplies and adds.
* ``"batched"``: the DAG run level by level instead of node by node (below); far fewer
  kernel launches, meant for launch-bound GPUs. On CPU its grouped depthwise backward and
  small-matrix bmm cost more than the launches they save.

With either, the parameters stay the stage's per-node ``NodeOp`` modules, so state_dicts
and checkpoints are interchangeable between executors, and the results equal the
reference executor's up to floating-point summation order.

"batched": nodes at the same longest-path depth never feed each other, so one *level* is run as

* aggregation: every level's output is one tensor ``(B, k*C, H, W)`` (its ``k`` nodes
  side by side along channels). The weighted sums of all ``k`` nodes of the next level are
  one small matrix product per *source* level, ``M (k, k_src) @ L_src.view(B, k_src, C*H*W)``,
  where ``M`` holds sigmoid(agg_weight) on the DAG's edges (and, with DropPath in
  training, per-sample ``(B, k, k_src)`` weights). Single-input nodes get weight 1, as the
  reference passes their input through;
* ReLU, then one depthwise 3x3 conv (``groups = k*C``, weights ``torch.cat`` of the nodes'
  ``conv_dw``), one grouped 1x1 conv (``groups = k``, weights ``torch.cat`` of ``conv_pw``)
  and one normalisation over the ``k*C`` channels:
  BN -> one ``F.batch_norm`` on cat'ed weight/bias/running stats; in training the updated
  running stats and ``num_batches_tracked`` are written back to every node's buffers;
  FrozenBN -> the concatenated frozen scale/shift (same formula as detectron2's);
  GN -> one ``F.group_norm`` with ``k * groups`` groups (identical statistics);
  anything else (SyncBN, naiveSyncBN, custom) -> each node's own norm module on its slice.
* the input level (nodes fed by the stage input) reads the stage input once: one ReLU,
  one depthwise stride-2 conv with ``groups = C_in`` and the nodes' kernels interleaved
  (``k`` outputs per input channel), a channel permutation, then the grouped 1x1 conv.
* the stage output (mean of the sink nodes) is accumulated as each level finishes, and
  a level's tensor is dropped once its last consumer has run.

DropPath: all masks of a forward are drawn up front, node by node in topological order
with :func:`~randwire_d2.modeling.node.drop_path_mask` -- the same calls in the same order
as the reference, so under one seed both executors drop exactly the same edges.

Concatenated weights are rebuilt on every forward when autograd needs them; without
autograd (inference) they are cached and refreshed when any parameter's version changes.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .node import drop_path_mask

__all__ = [
    "EXECUTORS", "DEFAULT_EXECUTOR", "FORWARDS", "StagePlan", "batched_forward", "fused_forward",
    "set_executor",
]

EXECUTORS = ("reference", "fused", "batched")
DEFAULT_EXECUTOR = "fused"  # fastest measured on CPU (benchmarks/README.md); GPU not yet measured


class _Level:
    __slots__ = (
        "index", "nodes", "is_input", "param_nodes", "single_nodes", "sources", "rows", "cols",
        "src_offsets", "out_sources", "out_cols", "free_after",
    )


class StagePlan:
    """Static schedule of a :class:`GraphSpec`: levels, edge matrices' indices, lifetimes."""

    def __init__(self, graph, has_agg_weight: Sequence[bool]):
        depths = graph.depths
        preds = graph.predecessors
        num_levels = max(depths) + 1
        members: List[List[int]] = [[] for _ in range(num_levels)]
        for v in graph.topological_order:
            members[depths[v]].append(v)
        # where each node's output lives: (level, position in the level)
        where = {v: (d, i) for d, nodes in enumerate(members) for i, v in enumerate(nodes)}
        outputs = set(graph.output_nodes)
        self.num_outputs = len(outputs)
        self.levels: List[_Level] = []
        last_use: Dict[int, int] = {}
        for d, nodes in enumerate(members):
            lv = _Level()
            lv.index, lv.nodes = d, tuple(nodes)
            lv.is_input = d == 0
            lv.param_nodes = tuple(v for v in nodes if has_agg_weight[v])
            lv.single_nodes = tuple(v for v in nodes if preds[v] and not has_agg_weight[v])
            if not lv.is_input:
                sources = sorted({where[u][0] for v in nodes for u in preds[v]})
                offsets, total = {}, 0
                for s in sources:
                    offsets[s] = total
                    total += len(members[s])
                rows, cols = [], []
                # edge order = order of the concatenated weights: multi-input nodes' edges
                # (in agg_weight order), then single-input nodes' edges (weight 1).
                for v in lv.param_nodes + lv.single_nodes:
                    for u in preds[v]:
                        s, j = where[u]
                        rows.append(nodes.index(v))
                        cols.append(offsets[s] + j)
                        last_use[s] = d
                lv.sources, lv.rows, lv.cols = tuple(sources), tuple(rows), tuple(cols)
                lv.src_offsets = tuple(offsets[s] for s in sources) + (total,)
            outs = [i for i, v in enumerate(nodes) if v in outputs]
            lv.out_cols = tuple(outs)
            self.levels.append(lv)
        for lv in self.levels:
            lv.free_after = ()
        for s, d in last_use.items():
            self.levels[d].free_after += (s,)


def _plan(stage) -> StagePlan:
    plan = stage.__dict__.get("_batched_plan")
    if plan is None:
        plan = StagePlan(stage.graph, [n.agg_weight is not None for n in stage.nodes])
        stage.__dict__["_batched_plan"] = plan
        stage.__dict__["_batched_cache"] = {}
    return plan


# ----------------------------------------------------------------------------- helpers
def _needs_grad(tensors: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _cached(stage, key, tensors: Sequence[torch.Tensor], build):
    """``build()`` (a function of ``tensors``), cached while no tensor changes (no autograd)."""
    if _needs_grad(tensors):
        return build()
    cache = stage.__dict__["_batched_cache"]
    stamp = tuple((t.data_ptr(), t._version) for t in tensors)
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = build()
    cache[key] = (stamp, value)
    return value


def _index(stage, key, values, device) -> torch.Tensor:
    cache = stage.__dict__["_batched_cache"]
    full = ("index", key, str(device))
    t = cache.get(full)
    if t is None:
        t = cache[full] = torch.tensor(values, dtype=torch.long, device=device)
    return t


def _mix(parts, batch: int) -> torch.Tensor:
    """sum over (M, L) of M @ L.view(B, k_src, -1): M is (k, k_src) or (B, k, k_src).

    Explicit bmm with M broadcast over the batch: torch.matmul would fold the batch into
    the rows of a transposed copy of L (one extra read+write of every source level).
    """
    acc = None
    for m, level in parts:
        x = level.reshape(batch, m.shape[-1], -1)
        m = m.to(x.dtype)
        if m.dim() == 2:
            m = m.expand(batch, -1, -1).contiguous()  # stride-0 batches are slow in CPU bmm
        acc = torch.bmm(m, x) if acc is None else torch.baddbmm(acc, m, x)
    return acc


# ------------------------------------------------------------------------------- norms
def _norm(stage, level: _Level, norms: List[Optional[nn.Module]], y: torch.Tensor) -> torch.Tensor:
    first = norms[0]
    if first is None:
        return y
    kind = type(first)
    same = all(type(n) is kind for n in norms)
    if same and kind is nn.BatchNorm2d and _uniform_bn(norms):
        return _batch_norm(stage, level, norms, y)
    if same and kind.__name__ == "FrozenBatchNorm2d" and len({n.eps for n in norms}) == 1:
        return _frozen_bn(stage, level, norms, y)
    if same and kind is nn.GroupNorm and len({(n.num_groups, n.eps, n.affine) for n in norms}) == 1:
        return _group_norm(stage, level, norms, y)
    # SyncBN, naiveSyncBN, custom norms: each node's module on its own channels.
    return torch.cat([n(part) for n, part in zip(norms, y.split(y.shape[1] // len(norms), 1))], 1)


def _uniform_bn(norms) -> bool:
    keys = {(n.eps, n.momentum, n.affine, n.track_running_stats, n.training) for n in norms}
    if len(keys) != 1:
        return False
    first = norms[0]
    return not first.track_running_stats or first.running_mean is not None


def _batch_norm(stage, level, norms, y):
    """nn.BatchNorm2d.forward over the concatenated channels of ``norms``."""
    first = norms[0]
    training, tracking = first.training, first.track_running_stats
    factor = 0.0 if first.momentum is None else first.momentum
    if training and tracking:
        counters = [n.num_batches_tracked for n in norms]
        torch._foreach_add_(counters, 1)
        if first.momentum is None:
            factor = 1.0 / float(counters[0])
    weight, bias = _level_affine(stage, level, norms, "bn")
    if not tracking:
        return F.batch_norm(y, None, None, weight, bias, True, factor, first.eps)
    means = [n.running_mean for n in norms]
    variances = [n.running_var for n in norms]
    if training:
        mean, var = torch.cat(means), torch.cat(variances)
        out = F.batch_norm(y, mean, var, weight, bias, True, factor, first.eps)
        with torch.no_grad():
            sizes = [m.numel() for m in means]
            torch._foreach_copy_(means, list(mean.split(sizes)))
            torch._foreach_copy_(variances, list(var.split(sizes)))
        return out
    mean = _cached(stage, ("bn_m", level.index), means, lambda: torch.cat(means))
    var = _cached(stage, ("bn_v", level.index), variances, lambda: torch.cat(variances))
    return F.batch_norm(y, mean, var, weight, bias, False, factor, first.eps)


def _frozen_bn(stage, level, norms, y):
    """detectron2 FrozenBatchNorm2d.forward over the concatenated channels."""
    eps = norms[0].eps
    buffers = [t for n in norms for t in (n.weight, n.bias, n.running_mean, n.running_var)]

    def cat(name):
        return torch.cat([getattr(n, name) for n in norms])

    if y.requires_grad:
        def build():
            scale = cat("weight") * (cat("running_var") + eps).rsqrt()
            shift = cat("bias") - cat("running_mean") * scale
            return scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)

        scale, shift = _cached(stage, ("frozen_affine", level.index), buffers, build)
        return y * scale.to(y.dtype) + shift.to(y.dtype)
    w, b, m, v = _cached(
        stage, ("frozen_bn", level.index), buffers,
        lambda: (cat("weight"), cat("bias"), cat("running_mean"), cat("running_var")),
    )
    return F.batch_norm(y, m, v, w, b, training=False, eps=eps)


def _level_affine(stage, level, norms, kind):
    """The level's norm scales and shifts, concatenated (cached while unchanged)."""
    if not norms[0].affine:
        return None, None
    weight = _cached(stage, (f"{kind}_w", level.index), [n.weight for n in norms],
                     lambda: torch.cat([n.weight for n in norms]))
    bias = _cached(stage, (f"{kind}_b", level.index), [n.bias for n in norms],
                   lambda: torch.cat([n.bias for n in norms]))
    return weight, bias


def _group_norm(stage, level, norms, y):
    """Per-node GroupNorm(G, C) == GroupNorm(k*G, k*C) on the concatenation."""
    first = norms[0]
    weight, bias = _level_affine(stage, level, norms, "gn")
    return F.group_norm(y, first.num_groups * len(norms), weight, bias, first.eps)


# ----------------------------------------------------------------------------- forward
def _transform(stage, level: _Level, a: torch.Tensor, convs_dw, convs_pw) -> torch.Tensor:
    """ReLU'd aggregate (B, k*C, H, W) -> grouped depthwise -> grouped 1x1 -> norm."""
    k = len(level.nodes)
    w_dw = _cached(stage, ("dw", level.index), [c.weight for c in convs_dw],
                   lambda: torch.cat([c.weight for c in convs_dw]))
    w_pw = _cached(stage, ("pw", level.index), [c.weight for c in convs_pw],
                   lambda: torch.cat([c.weight for c in convs_pw]))
    y = F.conv2d(a, w_dw, None, 1, 1, 1, a.shape[1])
    y = F.conv2d(y, w_pw, None, 1, 0, 1, k)
    return _norm(stage, level, [c.norm for c in convs_pw], y)


def _input_level(stage, level: _Level, x: torch.Tensor) -> torch.Tensor:
    nodes = [stage.nodes[v] for v in level.nodes]
    k = len(nodes)
    convs_dw = [n.conv_dw for n in nodes]
    convs_pw = [n.conv_pw for n in nodes]
    stride = convs_dw[0].stride
    r = F.relu(x)
    if k == 1:
        y = F.conv2d(r, convs_dw[0].weight, None, stride, 1, 1, x.shape[1])
    else:
        c_in = x.shape[1]
        # (C_in, k, 1, 3, 3): output channel c*k + j is node j's filter on channel c
        w_dw = _cached(stage, ("dw", level.index), [c.weight for c in convs_dw],
                       lambda: torch.stack([c.weight for c in convs_dw], 1).flatten(0, 1))
        y = F.conv2d(r, w_dw, None, stride, 1, 1, c_in)
        b, _, h, w = y.shape
        # node-major channels (j*C_in + c) for the grouped 1x1 conv
        y = y.view(b, c_in, k, h, w).transpose(1, 2).reshape(b, k * c_in, h, w)
    w_pw = _cached(stage, ("pw", level.index), [c.weight for c in convs_pw],
                   lambda: torch.cat([c.weight for c in convs_pw]))
    y = F.conv2d(y, w_pw, None, 1, 0, 1, k)
    return _norm(stage, level, [c.norm for c in convs_pw], y)


def _drop_path_factors(stage, batch: int, device) -> Optional[Dict[int, torch.Tensor]]:
    """Per multi-input node, (k_v, B) keep-masks drawn exactly as the reference draws them."""
    masks = None
    for v in stage.graph.topological_order:
        node = stage.nodes[v]
        if node.agg_weight is not None and node.training and node.drop_path > 0.0:
            if masks is None:
                masks = {}
            masks[v] = drop_path_mask(node.num_inputs, batch, node.drop_path, device)
    return masks


def _edge_weights(stage, level: _Level, masks, batch: int, device, dtype):
    """Weights of the level's edges, in plan order: (E,) or, with DropPath, (E, B)."""
    nodes = stage.nodes
    params = [nodes[v].agg_weight for v in level.param_nodes]
    n_single = sum(len(stage.graph.predecessors[v]) for v in level.single_nodes)
    pieces = []
    if params:
        sig = torch.sigmoid(torch.cat(params) if len(params) > 1 else params[0])
        if masks is not None and any(v in masks for v in level.param_nodes):
            keeps, rates = [], set()
            for v in level.param_nodes:
                n = nodes[v]
                keeps.append(masks[v] if v in masks else torch.ones(n.num_inputs, batch, dtype=torch.bool, device=device))
                rates.add(n.drop_path if v in masks else 0.0)
            keep = torch.cat(keeps).to(sig.dtype)
            if len(rates) == 1:
                sig = sig[:, None] * keep / (1.0 - rates.pop())
            else:
                div = torch.cat([
                    torch.full((nodes[v].num_inputs,), 1.0 - (nodes[v].drop_path if v in masks else 0.0),
                               dtype=sig.dtype, device=device)
                    for v in level.param_nodes
                ])
                sig = sig[:, None] * keep / div[:, None]
        pieces.append(sig)
    if n_single:
        shape = (n_single, batch) if pieces and pieces[0].dim() == 2 else (n_single,)
        pieces.append(torch.ones(shape, dtype=pieces[0].dtype if pieces else dtype, device=device))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _aggregate(stage, level: _Level, outputs: Dict[int, torch.Tensor], masks, batch: int) -> torch.Tensor:
    ref = outputs[level.sources[0]]
    device = ref.device
    w = _edge_weights(stage, level, masks, batch, device, torch.float32)
    k, total = len(level.nodes), level.src_offsets[-1]
    rows = _index(stage, ("rows", level.index), level.rows, device)
    cols = _index(stage, ("cols", level.index), level.cols, device)
    if w.dim() == 1:
        m = torch.zeros(k, total, dtype=w.dtype, device=device).index_put((rows, cols), w)
    else:  # per-sample weights (DropPath)
        m = torch.zeros(k, total, batch, dtype=w.dtype, device=device).index_put((rows, cols), w)
        m = m.permute(2, 0, 1)
    offs = level.src_offsets
    parts = [(m[..., offs[i]:offs[i + 1]], outputs[s]) for i, s in enumerate(level.sources)]
    a = _mix(parts, batch)
    c = ref.shape[1] // (offs[1] - offs[0])
    return a.view(batch, k * c, ref.shape[2], ref.shape[3])


def batched_forward(stage, x: torch.Tensor) -> torch.Tensor:
    """RandWireStage.forward, one level of equal-depth nodes at a time."""
    plan = _plan(stage)
    batch = x.shape[0]
    masks = _drop_path_factors(stage, batch, x.device)
    outputs: Dict[int, torch.Tensor] = {}
    total = None
    for level in plan.levels:
        if level.is_input:
            y = _input_level(stage, level, x)
        else:
            a = F.relu_(_aggregate(stage, level, outputs, masks, batch))  # fresh tensor
            nodes = [stage.nodes[v] for v in level.nodes]
            y = _transform(stage, level, a, [n.conv_dw for n in nodes], [n.conv_pw for n in nodes])
        for s in level.free_after:
            del outputs[s]
        if level.out_cols:
            k = len(level.nodes)
            if len(level.out_cols) == k == 1:
                contrib = y
            else:
                sel = torch.zeros(1, k, dtype=torch.float32, device=y.device)
                sel[0, list(level.out_cols)] = 1.0
                contrib = _mix([(sel, y)], batch).view(batch, -1, y.shape[2], y.shape[3])
            total = contrib if total is None else total + contrib
        if len(level.out_cols) < len(level.nodes):
            outputs[level.index] = y
    return total / plan.num_outputs


def _fused_aggregate(node, inputs: List[torch.Tensor]) -> torch.Tensor:
    """NodeOp.aggregate as one kernel: tensordot of the weights with the stacked inputs."""
    if node.agg_weight is None:
        return inputs[0]
    weights = node.aggregation_weights(inputs[0].shape[0], inputs[0].device).to(inputs[0].dtype)
    stacked = torch.stack(inputs, 0)
    if weights.dim() == 1:
        return torch.tensordot(weights, stacked, dims=1)
    return torch.einsum("kb,kbchw->bchw", weights, stacked)  # per-sample (DropPath)


def fused_forward(stage, x: torch.Tensor) -> torch.Tensor:
    """The reference node-by-node loop with each node's weighted sum as one kernel."""
    graph = stage.graph
    live: Dict[int, torch.Tensor] = {}
    total = None
    outputs = stage._output_nodes
    for v in graph.topological_order:
        node = stage.nodes[v]
        preds = graph.predecessors[v]
        a = _fused_aggregate(node, [live[u] for u in preds]) if preds else x
        out = node.conv_pw(node.conv_dw(F.relu(a)))
        for u in stage._free_after.get(v, ()):
            del live[u]
        if v in outputs:
            total = out if total is None else total + out
        else:
            live[v] = out
    return total / len(outputs)


FORWARDS = {"fused": fused_forward, "batched": batched_forward}


def set_executor(module: nn.Module, executor: str) -> nn.Module:
    """Switch every RandWireStage inside ``module`` to ``executor`` (no parameter changes)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}.")
    for m in module.modules():
        if hasattr(m, "executor") and hasattr(m, "graph") and hasattr(m, "nodes"):
            m.executor = executor
    return module
