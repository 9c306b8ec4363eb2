"""The lean stage executor: the reference's arithmetic, saving and moving fewer bytes.

What a GPU training step of RandWire pays for is memory: activations kept for backward
and bytes read + written by many small memory-bound ops (``randwire_d2.cost``). Per node,
the reference keeps four tensors for backward (the inputs' outputs ``y``, ``a = ReLU(sum)``,
the depthwise output ``z`` and the pre-norm ``p``) and runs one kernel per multiply and
add. This executor runs each node as one autograd Function that

* writes its output into one buffer per stage (BN's ``out=``), so the weighted sum of a
  node's inputs is one gather over their rows (``embedding_bag`` with per-sample weights:
  reads each input once, writes the sum once, accumulates in fp32 on CUDA) instead of a
  multiply and an ``addcmul_`` per input, each re-reading and re-writing the sum; the ReLU
  runs in place on it;
* keeps only ``a`` and the node output ``y`` (which the consumers keep anyway): ``z`` is
  recomputed in backward (a depthwise conv, 9 MACs per element), and the BatchNorm
  backward runs from ``y`` instead of ``p``: with ``x_hat = (y - beta) / gamma`` it is
  ``native_batch_norm_backward(g, y, weight=gamma^2 * invstd, mean=beta, invstd=1/gamma)``,
  the same formula at no extra traffic (the in-place ABN trick);
* with ``recompute=True`` keeps only the inputs and ``y``: ``a`` is recomputed too;
* computes the aggregation-weight gradients as dot products (no product tensors), and
  adds ``w * delta`` into each input's gradient buffer in place (:class:`_StageTape`)
  instead of autograd's multiply-then-add per extra consumer;
* runs the nodes fed by the stage input as one Function (:class:`_InputLevel`): one
  shared ``ReLU(x)`` (the reference runs one per node), their depthwise outputs kept (the
  stride-2 conv shrinks them 4x), one grouped depthwise backward.

Numerics: forward and gradients equal the reference's up to summation order, except that
the BN weight gradient of a channel whose ``|gamma| < GAMMA_EPS`` loses precision (its
``x_hat`` cannot be recovered from ``y``): in-place ABN's known limit. detectron2's
``naiveSyncBN`` runs the same way across processes (``_sync_batch_norm_*``: one all-reduce of
the per-channel statistics in forward and of the gradient sums in backward, as its autograd
does). Norms other than BatchNorm2d / naiveSyncBN (training) and FrozenBN -- GN, torch's
SyncBN (CUDA-only, so untestable here), BN in eval mode with gradients -- run the node with
plain autograd ops (same results, the reference's memory).

Kernel launches: a weighted sum is one op whatever the in-degree, and per-node scalar work
is done once per stage -- the aggregation weights and DropPath masks of all nodes in one draw
(``RandWireStage.flat_aggregation_weights``, which the reference uses too, so both draw the
same masks), every gather's weights picked from them in one index op, the BN step counters
in one ``_foreach_add_``, the in-place-ABN backward terms of all BNs in one go
(:class:`_StageTape`), the aggregation-weight gradients written into one (edges, batch)
buffer -- and each parameter is cast once per step under autocast. The gathers' index
tensors are made once per batch size and device (:class:`BagPlan`). No host sync and no
value-dependent branch in the step (unless a BN has ``momentum=None``, whose factor needs
the step count on the host).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.utils import comm

__all__ = ["GAMMA_EPS", "BagPlan", "lean_forward"]

GAMMA_EPS = 1e-6
_conv_backward = torch.ops.aten.convolution_backward.default
_bn_backward = torch.ops.aten.native_batch_norm_backward.default
_bn_out = torch.ops.aten.native_batch_norm.out


def _weighted_sum_relu_(weights: torch.Tensor, xs: List[torch.Tensor]) -> torch.Tensor:
    """ReLU(sum_i w_i x_i) into one fresh tensor; ``weights`` is (k,) or per-sample (k, B)."""
    w = weights.to(xs[0].dtype)
    w = w.reshape(len(xs), -1, 1, 1, 1) if w.dim() == 2 else w
    out = xs[0] * w[0]
    for x, wi in zip(xs[1:], w[1:]):
        out.addcmul_(x, wi)
    return out.relu_()


def _batch_norm_factors(stage, batch_nodes: List[int]) -> Dict[int, float]:
    """nn.BatchNorm2d's step-count bookkeeping for one training forward of these nodes' BNs."""
    norms = [stage.nodes[v].conv_pw.norm for v in batch_nodes]
    if all(bn.momentum is not None for bn in norms):
        counters = [bn.num_batches_tracked for bn in norms if bn.num_batches_tracked is not None]
        if counters:
            torch._foreach_add_(counters, 1)  # one op for the stage
        return {v: bn.momentum for v, bn in zip(batch_nodes, norms)}
    factors = {}
    for v, bn in zip(batch_nodes, norms):  # momentum=None: cumulative average, needs the count
        bn.num_batches_tracked.add_(1)
        factors[v] = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    return factors


class _StageTape:
    """What the nodes of one lean stage share in a step.

    * ``grads``: gradients of node outputs, accumulated in place by their consumers. Letting
      autograd sum the gradients of a node used by several consumers costs a multiply and an
      add per extra consumer; here each consumer adds ``w * delta`` into one buffer
      (``addcmul_``). Node outputs' gradients never go through the engine.
    * ``edge_grad``: the (edges, batch) aggregation-weight gradients, each node writing its
      rows; autograd concatenates the rows once per stage.
    * the in-place-ABN backward terms of every BN, computed in one go on first use.
    * in the forward: the stage buffer every node writes its output into, and the gathers
      (``bags``: indices, offsets, per-sample weights per weighted node) that sum from it.
    """

    def __init__(self, edge_offsets: Dict[int, int], num_edges: int, num_nodes: int, bags: Dict[int, tuple]):
        self.grads: Dict[int, torch.Tensor] = {}
        self.edge_offsets, self.num_edges = edge_offsets, num_edges
        self.edge_grad: Optional[torch.Tensor] = None
        self.bn_inputs: Dict[int, tuple] = {}  # node -> (gamma, invstd) from the forward
        self.sync_count = 0  # synchronised BN: values per channel over all processes
        self._bn_terms: Optional[Dict[int, tuple]] = None
        self.num_nodes, self.bags = num_nodes, bags  # node -> (indices, offsets, weights) of its bag
        # forward only (end_forward drops them: the backward keeps what it needs itself)
        self.outputs: Optional[torch.Tensor] = None  # (nodes, B, C, H, W): what nodes write
        self._alias: Optional[torch.Tensor] = None  # the same memory: what nodes return and read
        self.table: Optional[torch.Tensor] = None  # _alias as (nodes * B, one sample's values)
        self._stats: Optional[torch.Tensor] = None  # BN's batch mean / invstd per node
        self._nhwc, self._row_shape = False, None

    def output_rows(self, v: int, like: torch.Tensor, stats_dtype: torch.dtype):
        """(where node ``v`` writes its output, the tensor it returns for it, its BN's mean and
        invstd outputs); the stage buffer is allocated on first use, laid out like ``like``.

        Written and returned tensors are two aliases of one storage with their own version
        counters: each row is written once, before it is returned, and never again, but
        writing row w would otherwise count as modifying row v (a view of the same base),
        which autograd refuses for a custom Function's outputs and saved tensors.
        """
        if self.outputs is None:
            b, c, h, w = self._row_shape = like.shape
            self._nhwc = not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
            shape = (self.num_nodes, b, h, w, c) if self._nhwc else (self.num_nodes, b, c, h, w)
            base = like.new_empty(shape)  # each node's row channels_last if its convolutions give it so
            alias = like.new_empty(0).set_(base.untyped_storage(), 0, base.shape, base.stride())
            order = (0, 1, 4, 2, 3) if self._nhwc else (0, 1, 2, 3, 4)
            self.outputs, self._alias = base.permute(order), alias.permute(order)
            self.table = alias.view(self.num_nodes * b, -1)
            self._stats = like.new_empty(2, self.num_nodes, c, dtype=stats_dtype)
        stats = self._stats[:, v]
        if stats.dtype != stats_dtype:  # a stage mixing norms of other dtypes (not ours)
            stats = like.new_empty(2, like.shape[1], dtype=stats_dtype)
        return self.outputs[v], self._alias[v].detach(), stats[0], stats[1]

    def weighted_sum(self, v: int, table: torch.Tensor) -> torch.Tensor:
        """sum_i w_i[b] x_i[b] over node ``v``'s inputs: one gather-and-sum of their rows of
        ``table`` (embedding_bag, fp32 accumulation on CUDA) instead of one multiply-add per input."""
        indices, offsets, weights = self.bags[v]
        out = F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)
        b, c, h, w = self._row_shape
        return out.view(b, h, w, c).permute(0, 3, 1, 2) if self._nhwc else out.view(b, c, h, w)

    def end_forward(self):
        """Drop the forward's references to the stage buffer: the node Functions keep the rows
        (and, recomputing, the table) they need, so it is freed with them after backward."""
        self.outputs = self._alias = self.table = self._stats = None

    def add(self, u: int, delta: torch.Tensor, w: Optional[torch.Tensor]):
        buf = self.grads.get(u)
        if buf is None:
            self.grads[u] = delta if w is None else delta * w
        elif w is None:
            buf.add_(delta)
        else:
            buf.addcmul_(delta, w)

    def pop(self, v: int, g: Optional[torch.Tensor]) -> torch.Tensor:
        buf = self.grads.pop(v, None)
        if buf is None and g is None:  # every consumer adds before its producer runs
            raise RuntimeError(f"lean executor: no gradient reached node {v}; use executor='reference'.")
        if buf is None:
            return g
        return buf if g is None else buf.add_(g)

    def edge_rows(self, v: int, k: int, like: torch.Tensor) -> torch.Tensor:
        if self.edge_grad is None:
            self.edge_grad = like.new_empty(self.num_edges, like.shape[0])
        start = self.edge_offsets[v]
        return self.edge_grad[start:start + k]

    def bn_terms(self, v: int):
        """(gamma^2 * invstd, 1/gamma) with |gamma| >= GAMMA_EPS: BN backward from its output."""
        if self._bn_terms is None:
            nodes = list(self.bn_inputs)
            gamma = torch.stack([self.bn_inputs[u][0] for u in nodes])
            invstd = torch.stack([self.bn_inputs[u][1] for u in nodes])
            safe = gamma.abs().clamp_min_(GAMMA_EPS).copysign_(gamma)  # |gamma| >= EPS, gamma's sign
            weight, inv = gamma * safe * invstd, safe.reciprocal()
            self._bn_terms = {u: (weight[i], inv[i]) for i, u in enumerate(nodes)}
        return self._bn_terms[v]


def _edge_dots_(xs: List[torch.Tensor], delta: torch.Tensor, out: torch.Tensor) -> None:
    """out[i, b] = <x_i[b], delta[b]>: the aggregation weights' gradient, per sample.

    One batched matmul per input, written into ``out`` (no product tensor, no stack); on
    CUDA reduced-precision matmuls accumulate in fp32. On CPU in reduced precision the
    products are summed in fp32, as the reference's autograd does.
    """
    batch = delta.shape[0]
    if delta.dtype in (torch.float16, torch.bfloat16) and delta.device.type == "cpu":
        for x, row in zip(xs, out):
            row.copy_(torch.sum(x * delta, dim=(1, 2, 3), dtype=torch.float32))
        return
    # flatten both in delta's memory order (NHWC under channels_last): views, not copies
    nhwc = not delta.is_contiguous() and delta.is_contiguous(memory_format=torch.channels_last)
    order = (0, 2, 3, 1) if nhwc else (0, 1, 2, 3)
    flat = delta.permute(order).reshape(batch, -1, 1)
    for x, row in zip(xs, out):
        torch.bmm(x.permute(order).reshape(batch, 1, -1), flat, out=row.view(batch, 1, 1))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives convolutions (the input's own without autocast)."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _pw_norm_forward(node, v, mode, tape, factor, z, w_pw, gamma, beta):
    """1x1 conv + norm of ``z``; returns y and what the backward needs (FrozenBN: the scale)."""
    p = F.conv2d(z, w_pw)
    norm = node.conv_pw.norm
    out, y, mean, invstd = tape.output_rows(v, p, p.dtype if gamma is None else gamma.dtype)
    if mode == "batch":
        _bn_out(p, gamma, beta, norm.running_mean, norm.running_var, True, factor, norm.eps,
                out=out, save_mean=mean, save_invstd=invstd)
        tape.bn_inputs[v] = (gamma, invstd)
        return y, None
    if mode == "sync":
        _sync_batch_norm_forward(norm, tape, v, p, gamma, beta, (out, mean, invstd))
        return y, None
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    scale = scale.reshape(1, -1, 1, 1).to(p.dtype)
    torch.addcmul(shift.reshape(1, -1, 1, 1).to(p.dtype), p, scale, out=out)
    return y, scale


def _pw_norm_backward(mode, tape, v, g, y, scale, beta, z, w_pw, need_gamma, need_beta, need_w):
    """Gradients through norm and 1x1 conv: (grad_z, grad_w_pw, grad_gamma, grad_beta)."""
    g = g.to(y.dtype)
    grad_gamma = grad_beta = None
    if mode == "batch":
        # BN backward from its output: x_hat = (y - beta) / gamma (see module docstring)
        weight, inv = tape.bn_terms(v)
        grad_p, grad_gamma, grad_beta = _bn_backward(
            g, y, weight, None, None, beta, inv, True, 0.0, [True, need_gamma, need_beta],
        )
    elif mode == "sync":
        grad_p, grad_gamma, grad_beta = _sync_batch_norm_backward(tape, v, g, y, beta, need_gamma, need_beta)
    else:
        grad_p = g * scale
    del g
    grad_z, grad_w, _ = _conv_backward(
        grad_p, z, w_pw, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, need_w, False],
    )
    return grad_z, grad_w, grad_gamma, grad_beta


def _sync_batch_norm_forward(norm, tape, v, p, gamma, beta, outs):
    """detectron2's NaiveSyncBatchNorm (stats_mode ""): the batch statistics averaged over the
    processes with one all-reduce of (mean, mean of squares), biased running variance."""
    var_local, mean = torch.var_mean(p, dim=(0, 2, 3), correction=0)
    stats = torch.cat([mean, var_local.addcmul_(mean, mean)]).float()  # (mean, E[p^2]) per channel
    torch.distributed.all_reduce(stats)
    mean, meansqr = stats.mul_(1.0 / comm.get_world_size()).split(p.shape[1])
    var = torch.addcmul(meansqr, mean, mean, value=-1)
    torch.lerp(norm.running_mean, mean, norm.momentum, out=norm.running_mean)
    torch.lerp(norm.running_var, var, norm.momentum, out=norm.running_var)
    tape.bn_inputs[v] = (gamma, (var + norm.eps).rsqrt_())
    tape.sync_count = p.numel() // p.shape[1] * comm.get_world_size()
    # normalise with the global statistics: BN's inference formula, one kernel
    y, scratch_mean, scratch_invstd = outs
    _bn_out(p, gamma, beta, mean, var, False, 0.0, norm.eps, out=y, save_mean=scratch_mean,
            save_invstd=scratch_invstd)


def _sync_batch_norm_backward(tape, v, g, y, beta, need_gamma, need_beta):
    """Synchronised BN backward from the output: the local sums of g and g * x_hat (which are
    also the local gamma / beta gradients) all-reduced, then
    grad_p = gamma * invstd * (g - mean(g) - x_hat * mean(g * x_hat)) over the global batch."""
    weight, inv = tape.bn_terms(v)  # gamma^2 * invstd (sign-safe), 1/gamma
    _, sum_gx, sum_g = _bn_backward(g, y, weight, None, None, beta, inv, True, 0.0, [False, True, True])
    sums = torch.cat([sum_g, sum_gx]).float()
    torch.distributed.all_reduce(sums)
    mean_g, mean_gx = sums.mul_(1.0 / tape.sync_count).split(g.shape[1])
    scale = weight * inv  # gamma * invstd
    slope = -(scale * mean_gx * inv)  # x_hat = (y - beta) * inv, folded into per-channel terms
    shift = -(scale * mean_g) - slope * beta
    shape = (1, -1, 1, 1)
    grad_p = torch.addcmul(shift.reshape(shape).to(g.dtype), g, scale.reshape(shape).to(g.dtype))
    grad_p.addcmul_(y, slope.reshape(shape).to(g.dtype))
    return grad_p, sum_gx if need_gamma else None, sum_g if need_beta else None


def _depthwise(a, w_dw, stride):
    return F.conv2d(a, w_dw, None, stride, 1, 1, w_dw.shape[0])


def _cast(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def _contiguous_as(t: torch.Tensor, dtype) -> torch.Tensor:
    """A contiguous copy in ``dtype``: one op (``to`` alone would keep a strided view)."""
    return t.contiguous() if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)


def _param_grad(grad: Optional[torch.Tensor], param: torch.Tensor) -> Optional[torch.Tensor]:
    return None if grad is None else grad.to(param.dtype)


class _InputLevel(torch.autograd.Function):
    """All nodes fed by the stage input: ReLU(x) once, per node depthwise (stride 2), 1x1, norm.

    apply(call, x, *params) with params (w_dw, w_pw, gamma, beta) per node; returns one
    output per node. Backward runs the nodes' depthwise convs as one grouped conv, so
    ReLU(x) is read once and its gradient written once (no sum over the nodes).
    ``call``: (nodes, modes, recompute, tape, node indices, BN factors).
    """

    @staticmethod
    def forward(ctx, call, x, *params):
        nodes, modes, recompute, tape, vs, factors = call
        ctx.set_materialize_grads(False)
        r = F.relu(x)
        dtype = _compute_dtype(r)
        r_c = r.to(dtype)
        outs, saved, cast = [], [], []
        for j, node in enumerate(nodes):
            w_dw, w_pw, gamma, beta = params[4 * j:4 * j + 4]
            w_dw_c, w_pw_c = w_dw.to(dtype), w_pw.to(dtype)  # one cast per parameter and step
            z = _depthwise(r_c, w_dw_c, 2)
            y, scale = _pw_norm_forward(node, vs[j], modes[j], tape, factors.get(vs[j]), z, w_pw_c, gamma, beta)
            outs.append(y)
            saved += [None if recompute else z, y, scale, w_dw_c, w_pw_c]
        ctx.call, ctx.num = call, len(nodes)
        ctx.save_for_backward(r, r_c if r_c is not r else None, *params, *saved)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        nodes, modes, _, tape, vs, _ = ctx.call
        k, need = ctx.num, ctx.needs_input_grad
        r, r_c, *rest = ctx.saved_tensors
        r_c = r if r_c is None else r_c
        params, saved = rest[:4 * k], rest[4 * k:]
        grad_params, grad_zs, w_dws = [], [], []
        for j in range(k):
            w_dw, w_pw, gamma, beta = params[4 * j:4 * j + 4]
            z, y, scale, w_dw_c, w_pw_c = saved[5 * j:5 * j + 5]
            w_dws.append(w_dw_c)
            if z is None:
                z = _depthwise(r_c, w_dw_c, 2)
            g = tape.pop(vs[j], grads[j])
            grad_z, grad_w_pw, grad_gamma, grad_beta = _pw_norm_backward(
                modes[j], tape, vs[j], g, y, scale, beta, z, w_pw_c,
                need[4 + 4 * j], need[5 + 4 * j], need[3 + 4 * j],
            )
            grad_zs.append(grad_z)
            grad_params.append([None, _param_grad(grad_w_pw, w_pw), grad_gamma, grad_beta])
            del z, g
        # one grouped depthwise backward; channel c*k + j is node j's filter on channel c
        c_in = r.shape[1]
        if r_c.is_contiguous(memory_format=torch.channels_last) and not r_c.is_contiguous():
            # NHWC: interleave the channels in one copy that stays channels_last
            grad_int = torch.stack([g.permute(0, 2, 3, 1) for g in grad_zs], -1).flatten(3, 4).permute(0, 3, 1, 2)
        else:
            grad_int = torch.stack(grad_zs, 2).flatten(1, 2)
        del grad_zs
        w_int = torch.stack(w_dws, 1).flatten(0, 1)
        grad_r, grad_w_int, _ = _conv_backward(
            grad_int, r_c, w_int, None, [2, 2], [1, 1], [1, 1], False, [0, 0], c_in,
            [need[1], any(need[2 + 4 * j] for j in range(k)), False],
        )
        del grad_int
        if grad_w_int is not None:
            # one node-major copy for the stage: each node's gradient is a contiguous slice,
            # which AccumulateGrad takes as it is (a strided slice it would copy, node by node)
            per_node = _contiguous_as(grad_w_int.view(c_in, k, 1, 3, 3).transpose(0, 1), params[0].dtype)
            for j in range(k):
                if need[2 + 4 * j]:
                    grad_params[j][0] = per_node[j]
        grad_x = None
        if grad_r is not None:
            grad_x = torch.ops.aten.threshold_backward(grad_r.to(r.dtype), r, 0)
        return (None, grad_x, *(g for gp in grad_params for g in gp))


class _NodeFunction(torch.autograd.Function):
    """A node fed by other nodes: weighted sum + ReLU -> depthwise 3x3 -> 1x1 -> norm.

    apply(call, weights, w_dw, w_pw, gamma, beta, *xs); ``call``: (node, mode, recompute,
    tape, v, preds, BN factor); ``weights`` (k, B) (None for one input); ``mode`` "batch":
    nn.BatchNorm2d in training, "affine": FrozenBN (no norm gradients). The gradients of
    ``xs`` go into ``tape`` (:class:`_StageTape`), those of ``weights`` into its edge rows.
    """

    @staticmethod
    def forward(ctx, call, weights, w_dw, w_pw, gamma, beta, *xs):
        node, mode, recompute, tape, v, _, factor = call
        ctx.set_materialize_grads(False)
        a = tape.weighted_sum(v, tape.table).relu_() if len(xs) > 1 else F.relu(xs[0])
        dtype = _compute_dtype(a)
        w_dw_c, w_pw_c = w_dw.to(dtype), w_pw.to(dtype)  # one cast per parameter and step
        z = _depthwise(a.to(dtype), w_dw_c, node.stride)
        y, scale = _pw_norm_forward(node, v, mode, tape, factor, z, w_pw_c, gamma, beta)
        del z
        ctx.call, ctx.dtype = call, dtype
        table = tape.table if recompute and len(xs) > 1 else None
        ctx.save_for_backward(None if recompute else a, weights, w_dw, w_pw, beta, y, scale, w_dw_c, w_pw_c,
                              table, *xs)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, weights, w_dw, w_pw, beta, y, scale, w_dw_c, w_pw_c, table, *xs = ctx.saved_tensors
        node, mode, _, tape, v, preds, _ = ctx.call
        need = ctx.needs_input_grad
        g = tape.pop(v, g)
        if a is None:  # recompute
            a = tape.weighted_sum(v, table).relu_() if len(xs) > 1 else F.relu(xs[0])
        a_c = a.to(ctx.dtype)
        z = _depthwise(a_c, w_dw_c, node.stride)  # recomputed: 9 MACs per element
        grad_z, grad_w_pw, grad_gamma, grad_beta = _pw_norm_backward(
            mode, tape, v, g, y, scale, beta, z, w_pw_c, need[4], need[5], need[3]
        )
        del g, z
        stride = [node.stride, node.stride]
        grad_a, grad_w_dw, _ = _conv_backward(
            grad_z, a_c, w_dw_c, None, stride, [1, 1], [1, 1], False, [0, 0],
            w_dw.shape[0], [True, need[2], False],
        )
        del grad_z
        delta = torch.ops.aten.threshold_backward(grad_a.to(a.dtype), a, 0)  # through the ReLU
        del grad_a
        grad_w = None
        if len(xs) == 1:
            tape.add(preds[0], delta, None)
        else:
            if need[1]:
                grad_w = tape.edge_rows(v, len(xs), delta)
                _edge_dots_(xs, delta, grad_w)
            w = weights.to(delta.dtype).reshape(len(xs), delta.shape[0], 1, 1, 1)
            for u, wi in zip(preds, w):
                tape.add(u, delta, wi)
        return (None, grad_w, _param_grad(grad_w_dw, w_dw), _param_grad(grad_w_pw, w_pw),
                grad_gamma, grad_beta) + (None,) * len(xs)


class BagPlan:
    """The index tensors of a stage's weighted sums as gathers from its buffer of node outputs
    (rows ``node * batch + sample``), made once per batch size and device and kept: a step
    creates none, and a captured step replays the same ones."""

    def __init__(self, predecessors: Dict[int, List[int]]):
        self.predecessors = predecessors  # weighted node -> its inputs, in edge-row order
        self._cache: Dict[tuple, tuple] = {}

    def tensors(self, batch: int, device):
        """({node: (indices, offsets)}, rows, cols): node v's bag of sample b holds its inputs'
        rows for b; (rows, cols) pick each bag's weights from the (edges, batch) weights."""
        key = (batch, str(device))
        if key not in self._cache:
            if len(self._cache) >= 8:  # a few batch sizes in a run (last batch, eval): keep it small
                self._cache.clear()
            index, rows, cols, start = {}, [], [], 0
            for v, preds in self.predecessors.items():
                k = len(preds)
                index[v] = (
                    torch.tensor([u * batch + b for b in range(batch) for u in preds], device=device),
                    torch.tensor(range(0, k * batch, k), device=device),
                )
                rows += [start + i for _ in range(batch) for i in range(k)]
                cols += [b for b in range(batch) for _ in range(k)]
                start += k
            self._cache[key] = (index, torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        return self._cache[key]


def _mode(node) -> Optional[str]:
    norm = node.conv_pw.norm
    if type(norm) in (nn.BatchNorm2d, NaiveSyncBatchNorm):
        if not (norm.training and norm.affine and norm.track_running_stats):
            return None
        if type(norm) is nn.BatchNorm2d:
            return "batch"
        if norm._stats_mode != "" or norm.momentum is None:
            return None
        # one process: NaiveSyncBatchNorm is BatchNorm2d
        return "sync" if comm.get_world_size() > 1 else "batch"
    if isinstance(norm, FrozenBatchNorm2d):
        return "affine"
    return None


def _needs_grad(stage, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in stage.parameters()))


def _norm_affine(node, mode):
    norm = node.conv_pw.norm
    return (norm.weight, norm.bias) if mode in ("batch", "sync") else (None, None)


def _plain_input_level(stage, x: torch.Tensor):
    """Inference, or norms without a lean path (GN, SyncBN): the input level in plain ops;
    returns its outputs and every node's aggregation weights."""
    graph = stage.graph
    weights = stage.aggregation_weights(x.shape[0], x.device)
    live: Dict[int, torch.Tensor] = {}
    r = F.relu(x)  # shared by every node fed by the stage input
    for v in graph.input_nodes:
        node = stage.nodes[v]
        live[v] = node.conv_pw(node.conv_dw(r))
    return live, weights


def lean_forward(stage, x: torch.Tensor) -> torch.Tensor:
    """RandWireStage.forward with the memory-lean autograd Functions above."""
    graph = stage.graph
    grad = _needs_grad(stage, x)
    modes = [_mode(node) for node in stage.nodes]
    lean = grad and all(m is not None for m in modes)
    if lean:
        offsets, start = {}, 0
        for v, k in zip(stage.weighted_nodes, stage.edge_counts):
            offsets[v], start = start, start + k
        factors = _batch_norm_factors(stage, [v for v, m in enumerate(modes) if m == "batch"])
        batch = x.shape[0]
        flat = stage.flat_aggregation_weights(batch, x.device)
        weights, bags = {}, {}
        if flat is not None:
            if flat.dim() == 1:  # no DropPath: the same weights for every sample
                flat = flat[:, None].expand(-1, batch)
            flat = flat.to(_compute_dtype(x))  # one cast for the stage
            weights = dict(zip(stage.weighted_nodes, flat.split(stage.edge_counts)))
            # the gathers' weights, every node's in its bag order (sample, input): one index op
            index, rows, cols = stage.bag_plan.tensors(batch, x.device)
            bag_weights = flat.detach()[rows, cols].split([k * batch for k in stage.edge_counts])
            bags = {v: (*index[v], w) for v, w in zip(stage.weighted_nodes, bag_weights)}
        tape = _StageTape(offsets, start, graph.num_nodes, bags)
        inputs = graph.input_nodes
        params = []
        for v in inputs:
            node = stage.nodes[v]
            params += [node.conv_dw.weight, node.conv_pw.weight, *_norm_affine(node, modes[v])]
        call = ([stage.nodes[v] for v in inputs], [modes[v] for v in inputs], stage.recompute, tape,
                inputs, factors)
        live = dict(zip(inputs, _InputLevel.apply(call, x, *params)))
    else:
        live, weights = _plain_input_level(stage, x)
    total, fresh = None, False
    for v in graph.topological_order:
        preds = graph.predecessors[v]
        if preds:
            node = stage.nodes[v]
            xs = [live[u] for u in preds]
            if lean:
                call = (node, modes[v], stage.recompute, tape, v, preds, factors.get(v))
                out = _NodeFunction.apply(
                    call, weights.get(v), node.conv_dw.weight, node.conv_pw.weight,
                    *_norm_affine(node, modes[v]), *xs,
                )
            elif len(xs) == 1:
                out = node.conv_pw(node.conv_dw(F.relu(xs[0])))
            elif not grad:  # in-place sum, nothing kept
                out = node.conv_pw(node.conv_dw(_weighted_sum_relu_(weights[v], xs)))
            else:
                out = node.conv_pw(node.conv_dw(F.relu(node.aggregate(xs, weights[v]))))
            live[v] = out
        for u in stage.free_after.get(v, ()):
            del live[u]
        if v in stage.output_node_set:
            out = live.pop(v)
            # sum of the sinks in a tensor of our own (node outputs are kept for backward)
            if total is None:
                total = out
            elif fresh:
                total.add_(out)
            else:
                total, fresh = total + out, True
    if lean:
        tape.end_forward()
    return total / len(stage.output_node_set)
