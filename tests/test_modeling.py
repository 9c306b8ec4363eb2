"""The RandWire network: node op, stage executor, shapes, gradients, complexity."""
import statistics

import pytest
import torch
from torch import nn

from randwire_d2.graphs import GraphSpec, generate_graph
from randwire_d2.modeling.network import RandWireNet, build_graph_specs
from randwire_d2.modeling.node import NodeOp, drop_path_mask
from randwire_d2.modeling.stage import RandWireStage

WS = {"k": 4, "p": 0.75}


def tiny_net(regime="regular", channels=8, nodes=10, seed=0, **kwargs):
    graphs = build_graph_specs(regime, nodes, "WS", WS, seed)
    return RandWireNet(regime=regime, channels=channels, graphs=graphs, **kwargs)


def test_node_op_matches_hand_computation():
    torch.manual_seed(0)
    node = NodeOp(3, 4, 4, norm="").eval()
    with torch.no_grad():
        node.agg_weight.copy_(torch.tensor([0.0, 1.0, -2.0]))
    xs = [torch.randn(2, 4, 5, 5) for _ in range(3)]
    w = torch.sigmoid(torch.tensor([0.0, 1.0, -2.0]))
    agg = torch.relu(w[0] * xs[0] + w[1] * xs[1] + w[2] * xs[2])
    ref = nn.functional.conv2d(
        nn.functional.conv2d(agg, node.conv_dw.weight, padding=1, groups=4), node.conv_pw.weight
    )
    torch.testing.assert_close(node(xs), ref)


def test_input_nodes_change_channels_and_stride():
    spec = generate_graph("WS", 8, 1, **WS)
    stage = RandWireStage(spec, 6, 10, norm="BN")
    for v, node in enumerate(stage.nodes):
        fed_by_input = v in spec.input_nodes
        assert node.stride == (2 if fed_by_input else 1)
        assert node.in_channels == (6 if fed_by_input else 10)
        assert node.out_channels == 10
        assert node.num_inputs == max(1, len(spec.predecessors[v]))
    assert stage(torch.randn(2, 6, 16, 16)).shape == (2, 10, 8, 8)


def test_stage_output_is_mean_of_sink_nodes():
    # 0 -> 2, 1 -> 2, 0 -> 3: sinks are 2 and 3
    spec = GraphSpec(num_nodes=4, edges=((0, 2), (1, 2), (0, 3)))
    stage = RandWireStage(spec, 3, 3, norm="").eval()
    x = torch.randn(1, 3, 8, 8)
    n = stage.nodes
    o0, o1 = n[0]([x]), n[1]([x])
    expected = (n[2]([o0, o1]) + n[3]([o0])) / 2
    torch.testing.assert_close(stage(x), expected)


def test_stage_frees_dead_outputs():
    spec = generate_graph("WS", 32, 0, **WS)
    stage = RandWireStage(spec, 4, 4, norm="")
    held, peak = set(), 0
    for v in spec.topological_order:  # replay the executor's bookkeeping
        held -= set(stage._free_after.get(v, ()))
        if v not in spec.output_nodes:
            held.add(v)
        peak = max(peak, len(held))
    assert not held  # everything consumed; sinks went straight into the running sum
    assert peak < spec.num_nodes // 2


@pytest.mark.parametrize("size", [(224, 224), (200, 300), (97, 131)])
def test_output_shapes(size):
    net = tiny_net(out_features=["stem", "res2", "res3", "res4", "res5"]).eval()
    h, w = size
    out = net(torch.randn(1, 3, h, w))
    for name, spec in net.output_shape().items():
        stride = spec.stride
        expect = (1, spec.channels, -(-h // stride), -(-w // stride))
        assert out[name].shape == expect, name
    if size == (224, 224):
        assert out["res5"].shape[-2:] == (7, 7)


def test_classifier_logits_and_unbuilt_stages():
    net = tiny_net(num_classes=10, out_features=["linear"])
    assert net(torch.randn(2, 3, 64, 48))["linear"].shape == (2, 10)
    partial = tiny_net(out_features=["res3"])
    assert not hasattr(partial, "res4") and not hasattr(partial, "res5") and partial.head is None
    with pytest.raises(ValueError, match="num_classes"):
        tiny_net(out_features=["linear"])
    with pytest.raises(ValueError, match="out_features"):
        tiny_net(out_features=["res6"])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for regime in ("small", "regular"):
        net = tiny_net(regime, num_classes=5, out_features=["linear"], drop_path=0.1)
        net.train()
        net(torch.randn(2, 3, 64, 64))["linear"].sum().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_drop_path_mask_keeps_one_input_and_is_off_at_eval():
    g = torch.Generator().manual_seed(0)
    mask = drop_path_mask(3, 10000, 0.9, "cpu", generator=g)
    assert mask.any(dim=0).all()
    # P(kept) = (1 - rate) plus one forced keep (of 3 edges) when all were dropped
    assert abs(mask.float().mean() - (0.1 + 0.9**3 / 3)) < 0.01
    torch.manual_seed(0)
    net = tiny_net(drop_path=0.5, num_classes=4, out_features=["linear"])
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    a, b = net(x)["linear"], net(x)["linear"]
    torch.testing.assert_close(a, b)
    net.train()
    torch.manual_seed(1)
    c = net(x)["linear"]
    torch.manual_seed(2)
    d = net(x)["linear"]
    assert not torch.allclose(c, d)


def test_same_seed_same_network():
    a, b = tiny_net(seed=3), tiny_net(seed=3)
    assert a.graph_specs == b.graph_specs
    assert tiny_net(seed=4).graph_specs != a.graph_specs


def test_freeze_at():
    net = tiny_net(freeze_at=3, out_features=["res2", "res3", "res4", "res5"])
    frozen = {n.split(".")[0] for n, p in net.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert frozen == {"stem", "res2", "res3"} and trainable == {"res4", "res5"}
    from detectron2.layers import FrozenBatchNorm2d

    assert isinstance(net.stem.conv1.norm, FrozenBatchNorm2d)
    assert not isinstance(net.res4.nodes[0].conv_pw.norm, FrozenBatchNorm2d)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN", "GN"])
def test_norm_variants(norm):
    net = tiny_net(channels=64, norm=norm, out_features=["res3"])
    assert net(torch.randn(2, 3, 32, 32))["res3"].shape == (2, 128, 4, 4)


def test_gn_needs_widths_divisible_by_32():
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny_net(channels=48, norm="GN")


def test_small_regime_complexity_matches_paper():
    """Paper: 583M multiply-adds and 5.6M parameters (C=78, N=32, WS(4, 0.75)), 224 px."""
    from fvcore.nn import FlopCountAnalysis, parameter_count

    flops, params = [], []
    for seed in range(5):
        # the reference executor: fvcore traces its plain ops (not lean's autograd Functions)
        net = tiny_net("small", channels=78, nodes=32, seed=seed, num_classes=1000, executor="reference").eval()
        counter = FlopCountAnalysis(net, torch.zeros(1, 3, 224, 224))
        counter.unsupported_ops_warnings(False)
        counter.uncalled_modules_warnings(False)
        flops.append(counter.total())
        params.append(parameter_count(net)[""])
    assert abs(statistics.mean(flops) / 583e6 - 1) < 0.02, statistics.mean(flops)
    assert abs(statistics.mean(params) / 5.6e6 - 1) < 0.02, statistics.mean(params)
