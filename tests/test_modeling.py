"""The RandWire network: node op, stage executor, shapes, gradients, complexity.

Expected widths, node counts and op orders are written out from the paper (Table 1), never
read back from the model. tools/mutate.py checks that breaking each of them fails here.
"""
import statistics
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from randwire_d2.graphs import GraphSpec, generate_graph
from randwire_d2.modeling.network import ClassifierHead, ConvStage, RandWireNet, Stem, build_graph_specs
from randwire_d2.modeling.node import NodeOp, drop_path_mask
from randwire_d2.modeling.stage import EXECUTORS, RandWireStage

from conftest import perturb_

WS = {"k": 4, "p": 0.75}

# Paper Table 1, N=32: stage -> (output channels, random-graph nodes; None = plain conv).
PAPER_TABLE = {
    ("small", 78): {"stem": (39, None), "res2": (78, None), "res3": (78, 32), "res4": (156, 32), "res5": (312, 32)},
    ("regular", 109): {
        "stem": (54, None), "res2": (109, 16), "res3": (218, 32), "res4": (436, 32), "res5": (872, 32)
    },
}


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


def randomized(module):
    """Non-trivial aggregation weights and BN statistics, so every op visibly matters."""
    torch.manual_seed(0)
    return perturb_(module)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("executor", EXECUTORS)
def test_stage_output_is_mean_of_sink_nodes(executor, training):
    # sinks 3, 4, 5 at depths 1, 2, 1; node 2 aggregates two inputs
    spec = GraphSpec(num_nodes=6, edges=((0, 2), (1, 2), (0, 3), (2, 4), (1, 5)))
    stage = randomized(RandWireStage(spec, 3, 4, norm="BN", executor=executor)).train(training)
    x = torch.randn(2, 3, 8, 8)
    n = stage.nodes
    with torch.no_grad():
        o0, o1 = n[0]([x]), n[1]([x])
        expected = (n[3]([o0]) + n[4]([n[2]([o0, o1])]) + n[5]([o1])) / 3
        torch.testing.assert_close(stage(x), expected, rtol=1e-5, atol=1e-5)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of storages created by ops inside the mode and still referenced."""

    def __init__(self):
        super().__init__()
        self.refs, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel():
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, storage.nbytes()
                    self.live += storage.nbytes()
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("executor", EXECUTORS)
def test_stage_frees_dead_outputs_while_running(executor):
    """Inference memory follows the DAG's frontier, not its size: each node's output is freed
    once its last consumer has run (measured on the tensors the executor really holds)."""
    n = 32  # a ladder: v feeds v+1 and v+2, so at most 2 outputs are ever needed at once
    spec = GraphSpec(num_nodes=n, edges=tuple((i, j) for i in range(n) for j in (i + 1, i + 2) if j < n))
    stage = RandWireStage(spec, 8, 8, norm="BN", executor=executor).eval()
    x = torch.randn(1, 8, 64, 64)
    node_output = 8 * 32 * 32 * 4  # bytes of one node's output (stride 2)
    with torch.no_grad():
        stage(x)  # warm any caches
        with LiveTensorBytes() as mode:
            out = stage(x)
    # 2 live outputs + a node's temporaries (measured: reference 7, lean 9); keeping every
    # output would hold n - 1 = 31
    assert mode.peak <= 12 * node_output, mode.peak / node_output
    assert mode.live <= out.untyped_storage().nbytes() + 64 * 1024  # all but the result freed


@pytest.mark.parametrize("regime, channels", sorted(PAPER_TABLE))
def test_stage_widths_and_node_counts_follow_paper_table(regime, channels):
    table = PAPER_TABLE[regime, channels]
    net = tiny_net(regime, channels=channels, nodes=32, out_features=list(table)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    prev = None
    for i, (name, (width, nodes)) in enumerate(table.items()):
        assert out[name].shape == (1, width, 32 >> i, 32 >> i), name
        assert net.output_shape()[name].channels == width, name
        stage = getattr(net, name)
        if name == "stem":
            assert stage.conv1.weight.shape == (width, 3, 3, 3)
        elif nodes is None:
            assert isinstance(stage, ConvStage) and stage.conv.weight.shape == (width, prev, 3, 3)
        else:
            assert isinstance(stage, RandWireStage) and stage.graph.num_nodes == len(stage.nodes) == nodes
            for v in stage.graph.input_nodes:  # the channel change happens at the input nodes
                node = stage.nodes[v]
                assert (node.in_channels, node.out_channels, node.stride) == (prev, width, 2), (name, v)
        prev = width


@pytest.mark.parametrize("size", [(224, 224), (200, 300), (97, 131)])
def test_output_shapes(size):
    net = tiny_net(out_features=["stem", "res2", "res3", "res4", "res5"]).eval()
    h, w = size
    with torch.no_grad():
        out = net(torch.randn(1, 3, h, w))
    # regular regime, C=8: stem C/2, then C, 2C, 4C, 8C at strides 2..32
    for name, ch, stride in [("stem", 4, 2), ("res2", 8, 4), ("res3", 16, 8), ("res4", 32, 16), ("res5", 64, 32)]:
        assert out[name].shape == (1, ch, -(-h // stride), -(-w // stride)), name
    if size == (224, 224):
        assert out["res5"].shape[-2:] == (7, 7)


def _bn(x, norm):
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


def test_head_conv2_and_stem_match_hand_written_forward():
    """Paper Table 1: head = ReLU, 1x1 conv, BN, ReLU, pool, FC; small conv2 = ReLU, 3x3 conv
    stride 2, BN; conv1 = 3x3 conv stride 2, BN (its ReLU is the next stage's first op)."""
    x = torch.randn(2, 6, 9, 7)  # half negative: a missing or moved ReLU changes everything
    head = randomized(ClassifierHead(6, 5, head_channels=12, dropout=0.5)).eval()
    with torch.no_grad():
        nn.init.normal_(head.fc.weight)
        y = F.relu(_bn(F.conv2d(F.relu(x), head.conv.weight), head.conv.norm))
        expected = F.linear(y.mean(dim=(2, 3)), head.fc.weight, head.fc.bias)
        torch.testing.assert_close(head(x), expected)
        conv2 = randomized(ConvStage(6, 10)).eval()
        expected = _bn(F.conv2d(F.relu(x), conv2.conv.weight, stride=2, padding=1), conv2.conv.norm)
        torch.testing.assert_close(conv2(x), expected)
        stem = randomized(Stem(6, 4)).eval()
        expected = _bn(F.conv2d(x, stem.conv1.weight, stride=2, padding=1), stem.conv1.norm)
        torch.testing.assert_close(stem(x), expected)


def test_classifier_logits_and_unbuilt_stages():
    net = tiny_net(num_classes=10, out_features=["linear"])
    assert net(torch.randn(2, 3, 64, 48))["linear"].shape == (2, 10)
    partial = tiny_net(out_features=["res3"])
    assert not hasattr(partial, "res4") and not hasattr(partial, "res5") and partial.head is None
    with pytest.raises(ValueError, match="num_classes"):
        tiny_net(out_features=["linear"])
    with pytest.raises(ValueError, match="out_features"):
        tiny_net(out_features=["res6"])


@pytest.mark.parametrize("regime", ["small", "regular"])
def test_gradients_reach_every_parameter(regime):
    # DropPath off: a dropped edge legitimately gets no gradient, and that is luck of the mask
    torch.manual_seed(0)
    for seed in range(2):
        net = tiny_net(regime, num_classes=5, out_features=["linear"], seed=seed, drop_path=0.0)
        net.train()
        net(torch.randn(2, 3, 64, 64))["linear"].sum().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (seed, name)


def test_drop_path_mask_keeps_one_input_and_varies_in_training():
    g = torch.Generator().manual_seed(0)
    mask = drop_path_mask(3, 10000, 0.9, "cpu", generator=g)
    assert mask.any(dim=0).all()
    # P(kept) = (1 - rate) plus one forced keep (of 3 edges) when all were dropped
    assert abs(mask.float().mean() - (0.1 + 0.9**3 / 3)) < 0.01
    torch.manual_seed(0)
    net = tiny_net(drop_path=0.5, num_classes=4, out_features=["linear"])
    x = torch.randn(2, 3, 32, 32)
    net.train()
    torch.manual_seed(1)
    c = net(x)["linear"]
    torch.manual_seed(2)
    d = net(x)["linear"]
    assert not torch.allclose(c, d)


@pytest.mark.parametrize("rate", [0.3, 0.7])
def test_drop_path_rescales_kept_edges_by_one_over_keep_rate(rate):
    """A kept edge weighs sigmoid(w) / (1 - rate), so an edge's expected weight in training is
    its eval weight (up to the rescue of samples that lost every edge); per stage and per node."""
    spec = generate_graph("WS", 12, 0, **WS)
    stage = randomized(RandWireStage(spec, 4, 4, drop_path=rate)).train()
    batch = 20000
    torch.manual_seed(0)
    flat = stage.flat_aggregation_weights(batch, "cpu")
    ks = torch.tensor(stage.edge_counts).repeat_interleave(torch.tensor(stage.edge_counts))
    sig = torch.sigmoid(torch.cat([stage.nodes[v].agg_weight for v in stage.weighted_nodes])).detach()
    expected = sig[:, None].expand_as(flat) / (1.0 - rate)
    kept = flat != 0
    assert torch.allclose(flat.detach()[kept], expected[kept], rtol=1e-6, atol=0)
    # P(kept) = (1 - rate) + rate^k / k (a sample that lost all k edges keeps one of them)
    p_keep = (1.0 - rate) + rate ** ks.double() / ks
    assert torch.allclose(kept.double().mean(1), p_keep, atol=0.015)
    # every sample keeps at least one edge of every node
    assert all(rows.any(0).all() for rows in kept.split(stage.edge_counts))
    node = stage.nodes[stage.weighted_nodes[0]]
    w = node.aggregation_weights(batch, "cpu").detach()
    own = torch.sigmoid(node.agg_weight).detach()[:, None].expand_as(w) / (1.0 - rate)
    assert torch.allclose(w[w != 0], own[w != 0], rtol=1e-6, atol=0)
    stage.eval()  # no DropPath, no rescale
    assert torch.equal(stage.flat_aggregation_weights(batch, "cpu").detach(), sig)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("executor", EXECUTORS)
def test_drop_path_is_off_at_eval(executor):
    """Eval output equals the same weights without DropPath; in training DropPath moves the
    output by far more than the tolerance, so a DropPath left on at eval cannot pass."""
    spec = generate_graph("WS", 12, 0, **WS)
    stage = randomized(RandWireStage(spec, 6, 6, drop_path=0.5, executor=executor))
    clean = RandWireStage(spec, 6, 6, drop_path=0.0, executor="reference")
    clean.load_state_dict(stage.state_dict())
    x = torch.randn(4, 6, 16, 16)
    with torch.no_grad():
        torch.manual_seed(2)
        torch.testing.assert_close(stage.eval()(x), clean.eval()(x), rtol=1e-5, atol=1e-6)
        torch.manual_seed(1)  # (training updates BN running stats: after the eval check)
        dropped, kept = stage.train()(x), clean.train()(x)  # batch-statistics BN in both
        assert _rel(dropped, kept) > 0.05


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
