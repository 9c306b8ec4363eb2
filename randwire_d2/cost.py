"""Device-independent training cost: activations kept, kernel launches and bytes moved.

Three numbers predict what a GPU training step pays for, and none needs a GPU:

* ``saved_mb_per_img``: the unique storages that autograd packs for backward during the
  training forward (seen through ``torch.autograd.graph.saved_tensors_hooks``), parameters
  and buffers excluded. It is the activation memory of a step: with batch 256 it dominates
  peak GPU memory.
* ``ops_per_step``: the non-view ATen ops of forward + backward (the optimizer update
  excluded), each at least one kernel launch on a GPU (5-10 us of host time): what a
  launch-bound step (small batches, detection) pays for.
* ``traffic_mb_per_img``: the sum of the sizes of every tensor argument and result of every
  ATen op of a training step -- forward, backward and the SGD momentum update -- (a
  ``TorchDispatchMode``; views are free); ``traffic_fwd_bwd_mb_per_img`` without the update.
  Depthwise convolutions and element-wise ops are memory-bound on a GPU, so this is what RandWire's
  step time follows; it is an upper bound on DRAM traffic (caches ignored).

MB = 1e6 bytes. All are exact counts for given shapes (the RNG is seeded): two runs agree
exactly. The byte ratios to ResNet-50 grow with the batch (ResNet-50's weight traffic is a
larger share at small batches); compare at the same batch. Compare a
model against ResNet-50 measured the same way (``tools/benchmark.py --cost``).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["ByteCounter", "training_cost"]

# views in all but their schema (reshape of a fresh result, a second tensor on a storage):
# no data moved, no kernel
_ALIASES = {torch.ops.aten._unsafe_view.default, torch.ops.aten.set_.source_Storage_storage_offset}
# gathers: read only the table rows their indices name (operand 0: table, 1: indices)
_GATHERS = {torch.ops.aten._embedding_bag_forward_only.default, torch.ops.aten._embedding_bag.default}
# allocations: no memory touched (their results are counted where an op writes them)
_ALLOCATIONS = {"empty", "new_empty", "empty_like", "empty_strided"}


def _operand_bytes(func, args, kwargs, out) -> int:
    """Bytes an op reads and writes: the sizes of its tensor operands and results."""
    if func.overloadpacket.__name__ in _ALLOCATIONS:
        return 0
    kwargs = kwargs or {}
    # an out= argument is written, not read: it is counted once, as the result
    outs = {a.name for a in func._schema.arguments if a.is_out}
    read = {k: v for k, v in kwargs.items() if k not in outs}
    tensors = tree_flatten((args, read, out))[0]
    total = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    if func in _GATHERS:  # the rows read, not the whole table (checked by page faults: tests/test_cost.py)
        table, indices = args[0], args[1]
        total -= table.numel() * table.element_size()
        total += indices.numel() * table[0].numel() * table.element_size()
    return total


class ByteCounter(TorchDispatchMode):
    """Sum of operand and result sizes of every ATen op run under it, and the op count (views excluded).

    ``ops``: non-view ATen ops, about one kernel launch each on a GPU (a few launch none:
    ``empty`` allocations, e.g. the one CPU's ``batch_norm`` makes per call). ``bytes``:
    allocations touch no memory, an ``out=`` tensor is written (counted once, as the
    result), a gather (``embedding_bag``) reads the table rows its indices name, not the
    whole table. ``histogram``
    (``keep_histogram=True``): the count per op name, to see where they go.
    """

    def __init__(self, keep_histogram: bool = False):
        super().__init__()
        self.bytes = 0
        self.ops = 0
        self.histogram: Optional[Counter] = Counter() if keep_histogram else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (getattr(func, "is_view", False) or func in _ALIASES):
            self.ops += func.namespace == "aten"  # not profiler markers (record_function)
            if self.histogram is not None:
                self.histogram[str(func.overloadpacket.__name__)] += 1
            self.bytes += _operand_bytes(func, args, kwargs, out)
        return out


class _SavedStorages:
    """Unique storages packed for backward, minus those of ``excluded`` (parameters, buffers)."""

    def __init__(self, excluded):
        self.excluded = excluded
        self.sizes: Dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.excluded:  # packed tensors stay alive: a pointer is a storage
            self.sizes[ptr] = storage.nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())


def training_cost(
    model: nn.Module,
    inputs: torch.Tensor,
    loss_fn: Optional[Callable] = None,
    *,
    seed: int = 0,
    batch: Optional[int] = None,
) -> Dict[str, float]:
    """``saved_mb_per_img``, ``traffic_mb_per_img`` (and ``_fwd_bwd``) and ``ops_per_step`` of one
    training step of ``model``.

    ``inputs``: what ``model`` takes (a batch tensor, or e.g. detectron2's list of dicts with
    ``batch`` images).

    ``loss_fn(model_output) -> scalar``; default: cross entropy against class 0 for a dict
    with "linear" or a tensor of logits. The model is put in training mode and takes one SGD
    step (momentum 0.9, lr 1e-9: the first step allocates the momentum buffers, which a
    real step reads and writes just the same); its gradients are cleared again.
    """
    batch = batch if batch is not None else (inputs.shape[0] if torch.is_tensor(inputs) else len(inputs))
    if loss_fn is None:
        def loss_fn(out):
            logits = out["linear"] if isinstance(out, dict) else out
            target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            return nn.functional.cross_entropy(logits.float(), target)

    model.train()
    model.zero_grad(set_to_none=True)  # as a training step starts: gradients are taken, not added
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-9, momentum=0.9) if params else None
    excluded = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = _SavedStorages(excluded)
    counter = ByteCounter()
    torch.manual_seed(seed)
    try:
        with counter:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                loss = loss_fn(model(inputs))
            saved_bytes = saved.bytes
            loss.backward()
            fwd_bwd, ops = counter.bytes, counter.ops
            if opt is not None:
                opt.step()
    finally:
        model.zero_grad(set_to_none=True)
    return {
        "saved_mb_per_img": saved_bytes / 1e6 / batch,
        "traffic_mb_per_img": counter.bytes / 1e6 / batch,
        "traffic_fwd_bwd_mb_per_img": fwd_bwd / 1e6 / batch,
        "ops_per_step": ops,
    }
