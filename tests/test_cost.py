"""The device-independent cost model (randwire_d2.cost) and the bounds the lean executor meets.

Bounds (issue 10), on the default training path of configs/imagenet/randwire_ws_regular_c109.yaml
(executor lean, DropPath 0.1, BN) against torchvision's ResNet-50, 224 px, fp32:
activations kept for backward <= 1.5x, bytes moved by a training step <= 2.5x; with
MODEL.RANDWIRE.RECOMPUTE activations <= 1.0x. The counts are exact (no timing).
"""
import os

import pytest
import torch
import torchvision
from torch import nn

from randwire_d2.cost import training_cost
from randwire_d2.engine import setup_cfg
from randwire_d2.modeling.classifier import RandWireClassifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C109 = os.path.join(REPO, "configs", "imagenet", "randwire_ws_regular_c109.yaml")
BATCH = 2


def test_counts_of_one_convolution_are_exact():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 10, 10)
    cost = training_cost(conv, x, loss_fn=lambda out: out.sum())
    # kept for backward: the input (the weight is a parameter, excluded)
    assert cost["saved_mb_per_img"] == pytest.approx(3 * 10 * 10 * 4 / 1e6)
    # the step moves at least the input, output and their gradients
    assert cost["traffic_fwd_bwd_mb_per_img"] > (3 + 8 + 8) * 100 * 4 / 1e6
    assert cost["traffic_mb_per_img"] > cost["traffic_fwd_bwd_mb_per_img"]  # + the SGD update


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

    net = _c109_backbone()
    stages = [net.res2, net.res3, net.res4, net.res5]
    assert all(s.executor == "lean" and not s.recompute and s.nodes[-1].drop_path == 0.1 for s in stages)
    x = torch.randn(BATCH, 3, 224, 224)
    cost = training_cost(net, x)
    saved = cost["saved_mb_per_img"] / resnet50_cost["saved_mb_per_img"]
    traffic = cost["traffic_mb_per_img"] / resnet50_cost["traffic_mb_per_img"]
    assert saved <= 1.5 and traffic <= 2.5, (saved, traffic)
    # MODEL.RANDWIRE.RECOMPUTE: at most ResNet-50's activations
    set_executor(net, "lean", recompute=True)
    cost = training_cost(net, x)
    assert cost["saved_mb_per_img"] / resnet50_cost["saved_mb_per_img"] <= 1.0
