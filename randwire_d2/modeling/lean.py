"""The lean stage executor: the reference's arithmetic, saving and moving fewer bytes.

What a GPU training step of RandWire pays for is memory: activations kept for backward
and bytes read + written by many small memory-bound ops (``randwire_d2.cost``). Per node,
the reference keeps four tensors for backward (the inputs' outputs ``y``, ``a = ReLU(sum)``,
the depthwise output ``z`` and the pre-norm ``p``) and runs one kernel per multiply and
add. This executor runs each node as one autograd Function that

* sums the weighted inputs in place (one multiply, then one ``addcmul_`` per input) and
  applies the ReLU in place: one output tensor, no intermediates;
* keeps only ``a`` and the node output ``y`` (which the consumers keep anyway): ``z`` is
  recomputed in backward (a depthwise conv, 9 MACs per element), and the BatchNorm
  backward runs from ``y`` instead of ``p``: with ``x_hat = (y - beta) / gamma`` it is
  ``native_batch_norm_backward(g, y, weight=gamma^2 * invstd, mean=beta, invstd=1/gamma)``,
  the same formula at no extra traffic (the in-place ABN trick);
* with ``recompute=True`` keeps only the inputs and ``y``: ``a`` is recomputed too;
* computes the aggregation-weight gradients as dot products (no product tensors), and
  adds ``w * delta`` into each input's gradient buffer in place (:class:`_GradTape`)
  instead of autograd's multiply-then-add per extra consumer;
* runs the nodes fed by the stage input as one Function (:class:`_InputLevel`): one
  shared ``ReLU(x)`` (the reference runs one per node), their depthwise outputs kept (the
  stride-2 conv shrinks them 4x), one grouped depthwise backward.

Numerics: forward and gradients equal the reference's up to summation order, except that
the BN weight gradient of a channel whose ``|gamma| < GAMMA_EPS`` loses precision (its
``x_hat`` cannot be recovered from ``y``): in-place ABN's known limit. Norms other than
BatchNorm2d (training) and FrozenBN -- GN, SyncBN, naiveSyncBN, BN in eval mode with
gradients -- run the node with plain autograd ops (same results, the reference's memory).
DropPath masks are drawn by ``NodeOp.aggregation_weights`` in topological order, exactly as
the reference draws them.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import FrozenBatchNorm2d

__all__ = ["GAMMA_EPS", "lean_forward"]

GAMMA_EPS = 1e-6
_conv_backward = torch.ops.aten.convolution_backward.default
_bn_backward = torch.ops.aten.native_batch_norm_backward.default


def _weighted_sum_relu_(weights: torch.Tensor, xs: List[torch.Tensor]) -> torch.Tensor:
    """ReLU(sum_i w_i x_i) into one fresh tensor; ``weights`` is (k,) or per-sample (k, B)."""
    w = weights.to(xs[0].dtype)
    w = w.reshape(len(xs), -1, 1, 1, 1) if w.dim() == 2 else w
    out = xs[0] * w[0]
    for x, wi in zip(xs[1:], w[1:]):
        out.addcmul_(x, wi)
    return out.relu_()


def _running_stats_factor(bn: nn.BatchNorm2d) -> float:
    """nn.BatchNorm2d's momentum bookkeeping for one training forward."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


class _GradTape:
    """Gradients of one stage's node outputs, accumulated in place by their consumers.

    Letting autograd sum the gradients of a node used by several consumers costs a
    multiply and an add per extra consumer; here each consumer adds ``w * delta`` into
    one buffer (``addcmul_``). Node outputs' gradients never go through the engine.
    """

    def __init__(self):
        self.grads: Dict[int, torch.Tensor] = {}

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


def _edge_dots(xs: List[torch.Tensor], delta: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """<x_i, delta> for each input (per sample with DropPath): the aggregation weights' gradient.

    fp32: a dot product reads both tensors once. Reduced precision: products summed in fp32,
    as the reference's autograd does (a bf16 dot accumulated in bf16 loses ~30%).
    """
    batch = delta.shape[0]
    if delta.dtype in (torch.float16, torch.bfloat16):
        dims = (1, 2, 3) if per_sample else None
        return torch.stack([torch.sum(x * delta, dim=dims, dtype=torch.float32) for x in xs])
    if per_sample:
        flat = delta.reshape(batch, -1, 1)
        return torch.stack([torch.bmm(x.reshape(batch, 1, -1), flat).reshape(batch) for x in xs])
    return torch.stack([torch.vdot(x.reshape(-1), delta.reshape(-1)) for x in xs])


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives convolutions (the input's own without autocast)."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _pw_norm_forward(node, mode, z, w_pw, gamma, beta):
    """1x1 conv + norm of ``z``; returns y and what the backward needs (invstd / scale)."""
    p = F.conv2d(z, w_pw.to(z.dtype))
    norm = node.conv_pw.norm
    if mode == "batch":
        factor = _running_stats_factor(norm)
        y, _, invstd = torch.native_batch_norm(
            p, gamma, beta, norm.running_mean, norm.running_var, True, factor, norm.eps
        )
        return y, invstd
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    scale = scale.reshape(1, -1, 1, 1).to(p.dtype)
    return torch.addcmul(shift.reshape(1, -1, 1, 1).to(p.dtype), p, scale), scale


def _pw_norm_backward(mode, g, y, extra, gamma, beta, z, w_pw, need_gamma, need_beta, need_w):
    """Gradients through norm and 1x1 conv: (grad_z, grad_w_pw, grad_gamma, grad_beta)."""
    g = g.to(y.dtype)
    grad_gamma = grad_beta = None
    if mode == "batch":
        # BN backward from its output: x_hat = (y - beta) / gamma (see module docstring)
        safe = torch.where(gamma >= 0, gamma.clamp_min(GAMMA_EPS), gamma.clamp_max(-GAMMA_EPS))
        grad_p, grad_gamma, grad_beta = _bn_backward(
            g, y, gamma * safe * extra, None, None, beta, safe.reciprocal(), True, 0.0,
            [True, need_gamma, need_beta],
        )
    else:
        grad_p = g * extra
    del g
    grad_z, grad_w, _ = _conv_backward(
        grad_p, z, w_pw.to(z.dtype), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [True, need_w, False],
    )
    return grad_z, None if grad_w is None else grad_w.to(w_pw.dtype), grad_gamma, grad_beta


def _depthwise(a, w_dw, stride):
    return F.conv2d(a, w_dw.to(a.dtype), None, stride, 1, 1, w_dw.shape[0])


class _InputLevel(torch.autograd.Function):
    """All nodes fed by the stage input: ReLU(x) once, per node depthwise (stride 2), 1x1, norm.

    apply(call, x, *params) with params (w_dw, w_pw, gamma, beta) per node; returns one
    output per node. Backward runs the nodes' depthwise convs as one grouped conv, so
    ReLU(x) is read once and its gradient written once (no sum over the nodes).
    ``call``: (nodes, modes, recompute, tape, node indices).
    """

    @staticmethod
    def forward(ctx, call, x, *params):
        nodes, modes, recompute = call[:3]
        ctx.set_materialize_grads(False)
        r = F.relu(x)
        r_c = r.to(_compute_dtype(r))
        outs, saved = [], []
        for j, node in enumerate(nodes):
            w_dw, w_pw, gamma, beta = params[4 * j:4 * j + 4]
            z = _depthwise(r_c, w_dw, 2)
            y, extra = _pw_norm_forward(node, modes[j], z, w_pw, gamma, beta)
            outs.append(y)
            saved += [None if recompute else z, y, extra]
        ctx.call, ctx.num = call, len(nodes)
        ctx.save_for_backward(r, r_c if r_c is not r else None, *params, *saved)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        nodes, modes, _, tape, vs = ctx.call
        k, need = ctx.num, ctx.needs_input_grad
        r, r_c, *rest = ctx.saved_tensors
        r_c = r if r_c is None else r_c
        params, saved = rest[:4 * k], rest[4 * k:]
        grad_params, grad_zs = [], []
        for j in range(k):
            w_dw, w_pw, gamma, beta = params[4 * j:4 * j + 4]
            z, y, extra = saved[3 * j:3 * j + 3]
            if z is None:
                z = _depthwise(r_c, w_dw, 2)
            g = tape.pop(vs[j], grads[j])
            grad_z, grad_w_pw, grad_gamma, grad_beta = _pw_norm_backward(
                modes[j], g, y, extra, gamma, beta, z, w_pw,
                need[4 + 4 * j], need[5 + 4 * j], need[3 + 4 * j],
            )
            grad_zs.append(grad_z)
            grad_params.append([None, grad_w_pw, grad_gamma, grad_beta])
            del z, g
        # one grouped depthwise backward; channel c*k + j is node j's filter on channel c
        c_in = r.shape[1]
        grad_int = torch.stack(grad_zs, 2).flatten(1, 2)
        del grad_zs
        w_int = torch.stack([params[4 * j] for j in range(k)], 1).flatten(0, 1).to(r_c.dtype)
        grad_r, grad_w_int, _ = _conv_backward(
            grad_int, r_c, w_int, None, [2, 2], [1, 1], [1, 1], False, [0, 0], c_in,
            [need[1], any(need[2 + 4 * j] for j in range(k)), False],
        )
        del grad_int
        if grad_w_int is not None:
            per_node = grad_w_int.view(c_in, k, 1, 3, 3).to(params[0].dtype)
            for j in range(k):
                grad_params[j][0] = per_node[:, j].contiguous() if need[2 + 4 * j] else None
        grad_x = None
        if grad_r is not None:
            grad_x = torch.ops.aten.threshold_backward(grad_r.to(r.dtype), r, 0)
        return (None, grad_x, *(g for gp in grad_params for g in gp))


class _NodeFunction(torch.autograd.Function):
    """A node fed by other nodes: weighted sum + ReLU -> depthwise 3x3 -> 1x1 -> norm.

    apply(call, weights, w_dw, w_pw, gamma, beta, *xs); ``call``: (node, mode, recompute,
    tape, v, preds); ``mode`` "batch": nn.BatchNorm2d in training, "affine": FrozenBN (no
    norm gradients). The gradients of ``xs`` go into ``tape`` (:class:`_GradTape`).
    """

    @staticmethod
    def forward(ctx, call, weights, w_dw, w_pw, gamma, beta, *xs):
        node, mode, recompute = call[:3]
        ctx.set_materialize_grads(False)
        a = _weighted_sum_relu_(weights, xs) if len(xs) > 1 else F.relu(xs[0])
        dtype = _compute_dtype(a)
        z = _depthwise(a.to(dtype), w_dw, node.stride)
        y, extra = _pw_norm_forward(node, mode, z, w_pw, gamma, beta)
        del z
        ctx.call, ctx.dtype = call, dtype
        ctx.save_for_backward(None if recompute else a, weights, w_dw, w_pw, gamma, beta, y, extra, *xs)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, weights, w_dw, w_pw, gamma, beta, y, extra, *xs = ctx.saved_tensors
        node, mode, _, tape, v, preds = ctx.call
        need = ctx.needs_input_grad
        g = tape.pop(v, g)
        if a is None:  # recompute
            a = _weighted_sum_relu_(weights, xs) if len(xs) > 1 else F.relu(xs[0])
        a_c = a.to(ctx.dtype)
        z = _depthwise(a_c, w_dw, node.stride)  # recomputed: 9 MACs per element
        grad_z, grad_w_pw, grad_gamma, grad_beta = _pw_norm_backward(
            mode, g, y, extra, gamma, beta, z, w_pw, need[4], need[5], need[3]
        )
        del g, z
        stride = [node.stride, node.stride]
        grad_a, grad_w_dw, _ = _conv_backward(
            grad_z, a_c, w_dw.to(a_c.dtype), None, stride, [1, 1], [1, 1], False, [0, 0],
            w_dw.shape[0], [True, need[2], False],
        )
        del grad_z
        grad_w_dw = None if grad_w_dw is None else grad_w_dw.to(w_dw.dtype)
        delta = torch.ops.aten.threshold_backward(grad_a.to(a.dtype), a, 0)  # through the ReLU
        del grad_a
        grad_w = None
        if len(xs) == 1:
            tape.add(preds[0], delta, None)
        else:
            w = weights.to(delta.dtype)
            batch = delta.shape[0]
            grad_w = _edge_dots(xs, delta, per_sample=weights.dim() == 2).to(weights.dtype)
            if weights.dim() == 2:
                w = w.reshape(len(xs), batch, 1, 1, 1)
            for u, wi in zip(preds, w):
                tape.add(u, delta, wi)
        return (None, grad_w, grad_w_dw, grad_w_pw, grad_gamma, grad_beta) + (None,) * len(xs)


def _mode(node) -> Optional[str]:
    norm = node.conv_pw.norm
    if type(norm) is nn.BatchNorm2d and norm.training and norm.affine and norm.track_running_stats:
        return "batch"
    if isinstance(norm, FrozenBatchNorm2d):
        return "affine"
    return None


def _needs_grad(stage, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in stage.parameters()))


def _aggregate_relu(node, xs: List[torch.Tensor], inplace: bool) -> torch.Tensor:
    if len(xs) == 1:
        return F.relu(xs[0])
    if inplace:  # no autograd: in-place sum, nothing kept
        return _weighted_sum_relu_(node.aggregation_weights(xs[0].shape[0], xs[0].device), xs)
    return F.relu(node.aggregate(xs))


def _norm_affine(node, mode):
    norm = node.conv_pw.norm
    return (norm.weight, norm.bias) if mode == "batch" else (None, None)


def lean_forward(stage, x: torch.Tensor) -> torch.Tensor:
    """RandWireStage.forward with the memory-lean autograd Functions above."""
    graph = stage.graph
    grad = _needs_grad(stage, x)
    modes = [_mode(node) for node in stage.nodes]
    live: Dict[int, torch.Tensor] = {}
    if grad and all(m is not None for m in modes):
        tape = _GradTape()
        inputs = graph.input_nodes
        params = []
        for v in inputs:
            node = stage.nodes[v]
            params += [node.conv_dw.weight, node.conv_pw.weight, *_norm_affine(node, modes[v])]
        call = ([stage.nodes[v] for v in inputs], [modes[v] for v in inputs], stage.recompute, tape, inputs)
        live.update(zip(inputs, _InputLevel.apply(call, x, *params)))
    else:  # inference, or norms without a lean path (GN, SyncBN): plain ops
        tape = None
        r = F.relu(x)  # shared by every node fed by the stage input
        for v in graph.input_nodes:
            node = stage.nodes[v]
            live[v] = node.conv_pw(node.conv_dw(r))
    total, fresh = None, False
    for v in graph.topological_order:
        preds = graph.predecessors[v]
        if preds:
            node = stage.nodes[v]
            xs = [live[u] for u in preds]
            if tape is not None:
                weights = node.aggregation_weights(xs[0].shape[0], xs[0].device) if len(xs) > 1 else None
                call = (node, modes[v], stage.recompute, tape, v, preds)
                out = _NodeFunction.apply(
                    call, weights, node.conv_dw.weight, node.conv_pw.weight,
                    *_norm_affine(node, modes[v]), *xs,
                )
            else:
                out = node.conv_pw(node.conv_dw(_aggregate_relu(node, xs, inplace=not grad)))
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
    return total / len(stage.output_node_set)
