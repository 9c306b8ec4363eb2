"""The device-independent cost model (randwire_d2.cost) and the bounds the lean executor meets.

Bounds (issues 10 and 17), on the default training path of
configs/imagenet/randwire_ws_regular_c109.yaml (executor lean, DropPath 0.1, BN) against
torchvision's ResNet-50, 224 px, fp32, batch 4 (the byte ratios grow with the batch; 2 is
looser): activations kept for backward <= 1.5x, bytes moved by a training step <= 2.5x
(forward + backward alone too), ATen ops per step <= 3.5x; with MODEL.RANDWIRE.RECOMPUTE
activations <= 1.0x. The counts are exact (no timing).
"""
import os
import sys

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from randwire_d2.cost import ByteCounter, training_cost
from randwire_d2.engine import setup_cfg
from randwire_d2.modeling.classifier import RandWireClassifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C109 = os.path.join(REPO, "configs", "imagenet", "randwire_ws_regular_c109.yaml")
BATCH = 4


def test_counts_of_one_convolution_are_exact():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 10, 10)
    conv(x).sum().backward()  # a gradient left over: the step must not count adding to it
    cost = training_cost(conv, x, loss_fn=lambda out: out.sum())
    # kept for backward: the input (the weight is a parameter, excluded)
    assert cost["saved_mb_per_img"] == pytest.approx(3 * 10 * 10 * 4 / 1e6)
    # the step moves at least the input, output and their gradients
    assert cost["traffic_fwd_bwd_mb_per_img"] > (3 + 8 + 8) * 100 * 4 / 1e6
    assert cost["traffic_mb_per_img"] > cost["traffic_fwd_bwd_mb_per_img"]  # + the SGD update
    # convolution, sum; backward: ones_like (the seed), convolution_backward (sum's is a view)
    assert cost["ops_per_step"] == 4


def test_op_counter_skips_views_and_counts_the_rest():
    x = torch.randn(4, 6)
    with ByteCounter(keep_histogram=True) as counter:
        y = x.view(6, 4).t().unsqueeze(0)[0].flatten(0, 0)  # views only
        z = (y * 2).relu_()
        z.sum()
    assert counter.ops == 3
    assert dict(counter.histogram) == {"mul": 1, "relu_": 1, "sum": 1}


def test_allocations_and_out_arguments_are_counted_as_written_once():
    a, b, c = torch.randn(1000), torch.randn(1000), torch.empty(1000)
    with ByteCounter() as functional:
        torch.add(a, b)
    with ByteCounter() as out_arg:
        torch.add(a, b, out=c)  # c is written, not read: the same traffic as the functional op
    with ByteCounter() as allocation:
        torch.empty(10**6)  # touches no memory
    assert functional.bytes == out_arg.bytes == 3 * 4000
    assert allocation.bytes == 0 and allocation.ops == 1


def _minor_faults() -> int:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts of a file mapping: Linux")
def test_a_gather_reads_only_the_rows_it_names(tmp_path):
    """The counter's gather rule (lean's weighted sums are embedding_bag gathers from a stage
    buffer), checked by another measure: page faults. The table is a mapped sparse file; a row
    never touched faults when read. Gathering 6 of its 2,048 rows must not fault the rest in
    (summing the whole table, the control, faults them all in)."""
    rows, width = 2048, 16384  # 64 KiB rows, 128 MiB
    path = tmp_path / "table"
    with open(path, "wb") as f:
        f.truncate(rows * width * 4)
    table = torch.from_file(str(path), shared=True, size=rows * width).view(rows, width)
    indices, offsets = torch.tensor([3, 700, 1500, 9, 1999, 1024]), torch.tensor([0, 3])
    table[indices] = 1.0  # the rows to read are in memory
    weights = torch.rand(6)
    F.embedding_bag(indices[:1], table[:4], torch.tensor([0]), mode="sum")  # first-call set-up
    before = _minor_faults()
    with ByteCounter() as counter:
        out = F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)
    gather_faults = _minor_faults() - before
    assert torch.allclose(out, weights.view(2, 3).sum(1, keepdim=True).expand(2, width))
    before = _minor_faults()
    table.sum()
    whole_faults = _minor_faults() - before
    # the measure sees reads: at least a fault per row (the kernel maps up to 64 KiB per fault)
    assert whole_faults >= rows // 2, whole_faults
    # the gather: its 2 output rows (32 pages) and bookkeeping (21 here; a whole read ~1,700)
    assert gather_faults < rows // 16, gather_faults
    row = width * 4
    # 6 rows read, 2 written, plus indices, offsets, weights and embedding_bag's small outputs
    assert 8 * row <= counter.bytes <= 8 * row + 1000, counter.bytes


def _c109_backbone(*opts):
    cfg = setup_cfg(C109, ["MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    return RandWireClassifier(cfg).backbone


@pytest.fixture(scope="module")
def resnet50_cost():
    torch.manual_seed(0)
    return training_cost(torchvision.models.resnet50(), torch.randn(BATCH, 3, 224, 224))


def test_cost_is_deterministic():
    net = _c109_backbone("MODEL.RANDWIRE.CHANNELS", 16, "MODEL.RANDWIRE.NODES", 10)
    x = torch.randn(2, 3, 64, 64)
    assert training_cost(net, x) == training_cost(net, x)


def test_default_training_path_meets_the_bounds(resnet50_cost):
    from randwire_d2.modeling.stage import set_executor

    from randwire_d2.modeling.stage import resolve_executor

    net = _c109_backbone()
    stages = [net.res2, net.res3, net.res4, net.res5]
    # the default "auto" runs lean on a GPU, the device the cost model speaks for
    assert all(s.executor == "auto" and not s.recompute and s.nodes[-1].drop_path == 0.1 for s in stages)
    assert resolve_executor("auto", False, torch.device("cuda")) == "lean"
    set_executor(net, "lean")
    x = torch.randn(BATCH, 3, 224, 224)
    cost = training_cost(net, x)
    ratio = {k: cost[k] / resnet50_cost[k] for k in cost}
    assert ratio["saved_mb_per_img"] <= 1.5, ratio
    assert ratio["traffic_mb_per_img"] <= 2.5 and ratio["traffic_fwd_bwd_mb_per_img"] <= 2.5, ratio
    # kernel launches: 1,596 ops vs ResNet-50's 462 (3.45x; 4,010 = 8.7x before issue 17)
    assert ratio["ops_per_step"] <= 3.5, ratio
    # MODEL.RANDWIRE.RECOMPUTE: at most ResNet-50's activations
    set_executor(net, "lean", recompute=True)
    cost = training_cost(net, x)
    assert cost["saved_mb_per_img"] / resnet50_cost["saved_mb_per_img"] <= 1.0
