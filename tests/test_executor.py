"""The lean stage executor (and its recompute option) against the reference node-by-node loop.

Outputs, input gradients, every parameter's gradient and the BN running statistics must
agree to 1e-5 relative error in fp32 (norm-wise), across generators, seeds, odd and
non-square sizes, train and eval mode, and the supported norms. The one exception is the
gradient of the aggregation weights: a sum over B*C*H*W terms of both signs, whose
cancellation turns summation-order noise into ~1e-5 relative error; it gets 1e-4 in fp32,
and the main test repeats every check in float64 at 1e-10, where no such slack is needed.
"""
import copy

import pytest
import torch

from detectron2.layers import FrozenBatchNorm2d

from randwire_d2.graphs import GraphSpec, generate_graph
from randwire_d2.modeling.network import RandWireNet, build_graph_specs
from randwire_d2.modeling.stage import EXECUTORS, RandWireStage, set_executor

from conftest import perturb_

GENERATORS = {"WS": {"k": 4, "p": 0.75}, "ER": {"p": 0.3}, "BA": {"m": 3}}
FAST = ["lean", "lean+recompute"]  # executor variants checked against the reference
RTOL = 1e-5
RTOL_AGG = 1e-4  # fp32 aggregation-weight gradients (see module docstring)
RTOL_F64 = 1e-10


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def perturbed_stage(spec, cin, cout, norm="BN", drop_path=0.0, seed=0):
    """A reference stage with non-trivial aggregation weights and running statistics."""
    torch.manual_seed(seed)
    stage = RandWireStage(spec, cin, cout, norm=norm, drop_path=drop_path, executor="reference")
    return perturb_(stage)


def run(stage, x, grad_out_seed=123, rng_seed=7):
    stage.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(rng_seed)  # DropPath masks
    out = stage(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out.dtype)
    out.backward(g)
    grads = {n: p.grad.detach().clone() for n, p in stage.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def assert_equivalent(ref, fast, x):
    f64 = x.dtype == torch.float64
    rtol = RTOL_F64 if f64 else RTOL
    out_r, gx_r, gp_r = run(ref, x)
    out_f, gx_f, gp_f = run(fast, x)
    assert out_r.shape == out_f.shape
    assert rel_err(out_r, out_f) < rtol
    assert rel_err(gx_r, gx_f) < rtol
    assert gp_r.keys() == gp_f.keys() and gp_r
    for name in gp_r:
        tol = RTOL_AGG if name.endswith("agg_weight") and not f64 else rtol
        assert rel_err(gp_r[name], gp_f[name]) < tol, name
    buffers_r, buffers_f = dict(ref.named_buffers()), dict(fast.named_buffers())
    assert buffers_r.keys() == buffers_f.keys()
    for name in buffers_r:
        if buffers_r[name].is_floating_point():
            assert rel_err(buffers_r[name], buffers_f[name]) < rtol, name
        else:
            assert torch.equal(buffers_r[name], buffers_f[name]), name


def pair(spec, cin, cout, executor, **kwargs):
    ref = perturbed_stage(spec, cin, cout, **kwargs)
    fast = copy.deepcopy(ref)
    name, _, option = executor.partition("+")
    set_executor(fast, name, recompute=option == "recompute")
    return ref, fast


CASES = [  # generator, seed, nodes, (cin, cout), (H, W)
    ("WS", 0, 12, (6, 8), (16, 16)),
    ("WS", 3, 16, (5, 7), (13, 19)),
    ("ER", 1, 12, (4, 8), (15, 9)),
    ("ER", 5, 10, (8, 8), (8, 8)),
    ("BA", 2, 12, (6, 10), (11, 14)),
    ("BA", 4, 9, (3, 5), (7, 7)),
    # the paper's N=32 for every generator
    ("WS", 7, 32, (4, 6), (9, 9)),
    ("ER", 7, 32, (4, 6), (9, 9)),
    ("BA", 7, 32, (4, 6), (9, 9)),
]


# recompute changes only what training keeps for backward: no eval case of its own
MODES = [("lean", True), ("lean", False), ("lean+recompute", True)]


@pytest.mark.parametrize("executor,training", MODES, ids=["lean-train", "lean-eval", "recompute-train"])
@pytest.mark.parametrize("gen,seed,nodes,channels,size", CASES)
def test_equivalent_to_reference(executor, training, gen, seed, nodes, channels, size):
    spec = generate_graph(gen, nodes, seed, **GENERATORS[gen])
    ref, fast = pair(spec, *channels, executor, seed=seed)
    ref.train(training)
    fast.train(training)
    x = torch.randn(3, channels[0], *size, generator=torch.Generator().manual_seed(seed))
    assert_equivalent(ref, fast, x)
    if training:  # a second step: updated running stats feed the same way
        assert_equivalent(ref, fast, x * 0.5 + 1.0)
    ref, fast = pair(spec, *channels, executor, seed=seed)  # fresh statistics, in float64
    assert_equivalent(ref.double().train(training), fast.double().train(training), x.double())


@pytest.mark.parametrize("executor", FAST)
@pytest.mark.parametrize("norm", ["FrozenBN", "GN", ""])
def test_equivalent_with_other_norms(executor, norm):
    spec = generate_graph("WS", 12, 1, **GENERATORS["WS"])
    cin, cout = (32, 64) if norm == "GN" else (6, 8)
    ref, fast = pair(spec, cin, cout, executor, norm="BN" if norm == "FrozenBN" else norm, seed=1)
    if norm == "FrozenBN":
        ref = FrozenBatchNorm2d.convert_frozen_batchnorm(ref)
        fast = FrozenBatchNorm2d.convert_frozen_batchnorm(fast)
        assert isinstance(fast.nodes[0].conv_pw.norm, FrozenBatchNorm2d)
    x = torch.randn(2, cin, 10, 12, generator=torch.Generator().manual_seed(0))
    assert_equivalent(ref.train(), fast.train(), x)
    if norm == "FrozenBN":  # no-grad inference takes FrozenBN's F.batch_norm branch
        with torch.no_grad():
            assert rel_err(ref.eval()(x), fast.eval()(x)) < RTOL


@pytest.mark.parametrize("executor", FAST)
def test_drop_path_draws_the_same_masks(executor):
    """Masks are drawn node by node in topological order by both executors: same seed, same edges."""
    spec = generate_graph("ER", 12, 2, **GENERATORS["ER"])
    ref, fast = pair(spec, 6, 8, executor, drop_path=0.4, seed=2)
    x = torch.randn(4, 6, 12, 12, generator=torch.Generator().manual_seed(1))
    assert_equivalent(ref.train(), fast.train(), x)
    # and DropPath is really active: another seed gives another output
    torch.manual_seed(99)
    other = fast(x)
    torch.manual_seed(7)
    assert rel_err(fast(x), other) > 1e-3


def test_state_dicts_interchangeable():
    graphs = build_graph_specs("regular", 10, "WS", GENERATORS["WS"], 0)
    nets = {e: RandWireNet(regime="regular", channels=16, graphs=graphs, num_classes=10, executor=e) for e in EXECUTORS}
    keys = {e: list(n.state_dict()) for e, n in nets.items()}
    assert all(k == keys["reference"] for k in keys.values())
    nets["lean"].load_state_dict(nets["reference"].state_dict())
    x = torch.randn(2, 3, 45, 61)
    outs = {e: n.eval()(x)["linear"] for e, n in nets.items()}
    assert rel_err(outs["reference"], outs["lean"]) < RTOL


def test_set_executor_and_validation():
    graphs = build_graph_specs("small", 8, "WS", GENERATORS["WS"], 0)
    net = RandWireNet(regime="small", channels=8, graphs=graphs, executor="reference")
    set_executor(net, "lean", recompute=True)
    assert {(s.executor, s.recompute) for s in net.modules() if isinstance(s, RandWireStage)} == {("lean", True)}
    with pytest.raises(ValueError, match="executor"):
        set_executor(net, "nope")
    with pytest.raises(ValueError, match="removed.*'lean'"):
        set_executor(net, "fused")
    with pytest.raises(ValueError, match="recompute=True needs the 'lean'"):
        set_executor(net, "reference", recompute=True)
    with pytest.raises(ValueError, match="executor"):
        RandWireStage(generate_graph("WS", 6, 0, k=2, p=0.5), 4, 4, executor="nope")


def test_config_selects_executor():
    from detectron2.config import get_cfg

    from randwire_d2.config import EXECUTORS as CFG_EXECUTORS, add_randwire_config, randwire_kwargs

    assert set(CFG_EXECUTORS) == set(EXECUTORS)
    cfg = add_randwire_config(get_cfg())
    cfg.MODEL.RANDWIRE.CHANNELS, cfg.MODEL.RANDWIRE.NODES = 8, 10
    for name in EXECUTORS:
        cfg.MODEL.RANDWIRE.EXECUTOR = name
        net = RandWireNet(**randwire_kwargs(cfg))
        assert {s.executor for s in net.modules() if isinstance(s, RandWireStage)} == {name}
    cfg.MODEL.RANDWIRE.EXECUTOR = "fast"
    with pytest.raises(ValueError, match="MODEL.RANDWIRE.EXECUTOR"):
        randwire_kwargs(cfg)
    cfg.MODEL.RANDWIRE.EXECUTOR = "batched"
    with pytest.raises(ValueError, match="MODEL.RANDWIRE.EXECUTOR.*were removed"):
        randwire_kwargs(cfg)
    cfg.MODEL.RANDWIRE.EXECUTOR, cfg.MODEL.RANDWIRE.RECOMPUTE = "reference", True
    with pytest.raises(ValueError, match="MODEL.RANDWIRE.RECOMPUTE.*'lean'"):
        randwire_kwargs(cfg)
    cfg.MODEL.RANDWIRE.EXECUTOR = "lean"
    net = RandWireNet(**randwire_kwargs(cfg))
    assert all(s.recompute for s in net.modules() if isinstance(s, RandWireStage))


def test_single_chain_and_single_node_graphs():
    chain = GraphSpec(num_nodes=4, edges=((0, 1), (1, 2), (2, 3)))
    lone = GraphSpec(num_nodes=1, edges=())
    for spec in (chain, lone):
        for executor in FAST:
            ref, fast = pair(spec, 3, 5, executor)
            assert_equivalent(ref.train(), fast.train(), torch.randn(2, 3, 9, 7))


def test_bf16_autocast_error_is_no_worse_than_the_reference():
    """Under bf16 autocast both executors round differently; lean must be as close to fp32."""
    spec = generate_graph("WS", 12, 0, **GENERATORS["WS"])
    ref, fast = pair(spec, 8, 16, "lean", drop_path=0.2)
    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    exact = run(copy.deepcopy(ref).train(), x)
    results = {}
    for name, stage in (("reference", ref), ("lean", fast)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[name] = run(stage.train(), x)
    assert results["lean"][0].dtype == results["reference"][0].dtype == torch.bfloat16
    for i in (0, 1):  # output, input gradient
        err = {n: rel_err(exact[i], r[i]) for n, r in results.items()}
        assert err["lean"] < 2 * err["reference"] + 1e-2, (i, err)
    # per parameter both are 5-20 % off fp32 (and either may be the worse one): compare means
    mean = {n: sum(rel_err(exact[2][k], r[2][k]) for k in exact[2]) / len(exact[2]) for n, r in results.items()}
    assert mean["lean"] < 1.2 * mean["reference"] + 1e-2, mean


def test_zero_bn_weight_gives_finite_gradients():
    """BN backward runs from the output: a channel with gamma == 0 must not poison the rest."""
    spec = generate_graph("WS", 8, 0, **GENERATORS["WS"])
    ref, fast = pair(spec, 4, 6, "lean")
    for stage in (ref, fast):
        with torch.no_grad():
            stage.nodes[5].conv_pw.norm.weight[2] = 0.0
    x = torch.randn(2, 4, 10, 10, generator=torch.Generator().manual_seed(0))
    (out_r, gx_r, gp_r), (out_f, gx_f, gp_f) = run(ref.train(), x), run(fast.train(), x)
    assert rel_err(out_r, out_f) < RTOL and rel_err(gx_r, gx_f) < RTOL
    for name in gp_r:
        assert torch.isfinite(gp_f[name]).all(), name
        if name != "nodes.5.conv_pw.norm.weight":  # that channel's gamma gradient is lost
            assert rel_err(gp_r[name], gp_f[name]) < RTOL_AGG, name


def test_repeated_backward_with_retain_graph_accumulates_like_reference():
    spec = generate_graph("WS", 8, 0, **GENERATORS["WS"])
    ref, fast = pair(spec, 4, 6, "lean")
    x = torch.randn(2, 4, 8, 8)
    probe = torch.randn(2, 6, 4, 4)  # a loss whose gradient does not vanish through BN
    grads = []
    for stage in (ref, fast):
        out = (stage.train()(x) * probe).sum()
        out.backward(retain_graph=True)
        out.backward()
        grads.append({n: p.grad for n, p in stage.named_parameters()})
    for name in grads[0]:
        assert rel_err(grads[0][name], grads[1][name]) < RTOL_AGG, name


@pytest.mark.parametrize("executor", ["reference", "lean"])
def test_inplace_parameter_edits_show_in_eval_output(executor):
    """No executor may cache weights: an edit through .data changes the next inference."""
    spec = generate_graph("ER", 10, 0, **GENERATORS["ER"])
    _, stage = pair(spec, 4, 6, executor)
    stage.eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        before = stage(x)
        stage.nodes[9].conv_pw.weight.data.mul_(3.0)
        stage.nodes[9].conv_pw.norm.running_mean.data.add_(1.0)
        after = stage(x)
    assert rel_err(before, after) > 1e-2


def test_compiled_stage_has_no_graph_break_and_matches_eager():
    """torch.compile (inductor, fullgraph) of a training stage: same outputs and gradients.

    DropPath is off: compiled random ops draw from inductor's generator, not eager's stream.
    """
    spec = generate_graph("WS", 5, 0, k=2, p=0.5)
    ref, stage = pair(spec, 4, 8, "lean")
    compiled = copy.deepcopy(stage)
    compiled.compile(fullgraph=True)  # raises on any graph break
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert_equivalent(stage.train(), compiled.train(), x)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in ref.named_parameters()]


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the non-view ATen ops run under it, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_training_step_is_capturable(executor):
    """What CUDA graphs (and torch.compile's reduce-overhead) need of a step: no host sync
    (``_local_scalar_dense``, i.e. .item()) and no value-dependent branch -- two steps with
    other data and other DropPath masks run the same op sequence."""
    graphs = build_graph_specs("regular", 10, "WS", GENERATORS["WS"], 0)
    torch.manual_seed(0)
    net = RandWireNet(regime="regular", channels=8, graphs=graphs, num_classes=4, drop_path=0.3, executor=executor)
    net.train()
    sequences = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        x = torch.randn(3, 3, 32, 32)
        with _OpRecorder() as rec:
            loss = torch.nn.functional.cross_entropy(net(x)["linear"], torch.tensor([0, 1, 2]))
            loss.backward()
        net.zero_grad(set_to_none=True)
        sequences.append(rec.ops)
    assert not any("_local_scalar_dense" in op for op in sequences[0]), executor
    assert sequences[0] == sequences[1]


def test_compile_mode_setting_and_validation():
    from detectron2.config import get_cfg

    from randwire_d2.config import add_randwire_config, randwire_kwargs

    cfg = add_randwire_config(get_cfg())
    cfg.MODEL.RANDWIRE.CHANNELS, cfg.MODEL.RANDWIRE.NODES = 8, 10
    assert randwire_kwargs(cfg)["compile_mode"] == "default"
    cfg.MODEL.RANDWIRE.COMPILE_MODE = "fast"
    with pytest.raises(ValueError, match="MODEL.RANDWIRE.COMPILE_MODE = 'fast' is invalid: allowed are"):
        randwire_kwargs(cfg)
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        RandWireNet(regime="small", channels=8, graphs=build_graph_specs("small", 8, "WS", GENERATORS["WS"], 0),
                    compile_mode="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_reduce_overhead_training_steps_on_cuda_match_eager():
    """MODEL.RANDWIRE.COMPILE with COMPILE_MODE reduce-overhead: CUDA-graph replays of a
    fixed-size training step give eager's losses and gradients (DropPath off: compiled RNG
    differs)."""
    graphs = build_graph_specs("regular", 10, "WS", GENERATORS["WS"], 0)
    torch.manual_seed(0)
    eager = RandWireNet(regime="regular", channels=16, graphs=graphs, num_classes=4).cuda()
    compiled = copy.deepcopy(eager)
    compiled.compile(mode="reduce-overhead")
    x = torch.randn(8, 3, 64, 64, device="cuda")
    y = torch.arange(8, device="cuda") % 4
    for _ in range(3):  # warm-up, record, replay
        grads = []
        for net in (eager, compiled):
            net.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net.train()(x)["linear"], y)
            loss.backward()
            grads.append((loss.detach().clone(), [p.grad.clone() for p in net.parameters()]))
        assert rel_err(grads[0][0], grads[1][0]) < 1e-3
        assert max(rel_err(a, b) for a, b in zip(grads[0][1], grads[1][1])) < 1e-2


def test_edge_gradients_are_matmuls_into_one_buffer():
    """The aggregation weights' gradients: one bmm per edge written into the stage's buffer --
    no per-edge product tensor, no per-node stack -- and one concatenation per stage."""
    from randwire_d2.cost import ByteCounter

    spec = generate_graph("WS", 12, 0, **GENERATORS["WS"])
    _, fast = pair(spec, 4, 6, "lean", drop_path=0.2)
    x = torch.randn(2, 4, 10, 10)
    out = fast.train()(x)
    with ByteCounter(keep_histogram=True) as counter:
        out.backward(torch.ones_like(out))
    hist = counter.histogram
    assert hist["bmm"] == sum(fast.edge_counts)
    assert hist["stack"] == 2 + 2  # BN terms (gamma, invstd); input level (gradients, filters)
    assert hist["cat"] == 1  # the edge rows of the stage, once
    assert hist["mul"] < sum(fast.edge_counts)  # edge products: the gradient tape's first adds only


@pytest.mark.parametrize("recompute", [False, True])
def test_weighted_sums_are_gathers_from_one_stage_buffer(recompute):
    """Forward: every node output is written into one stage buffer, and each weighted node's
    sum is one embedding_bag over its rows (no multiply-add per input). Only the node
    Functions' saved tensors keep the buffer: the stage's tape drops it after the forward."""
    from randwire_d2.cost import ByteCounter

    spec = generate_graph("WS", 12, 0, **GENERATORS["WS"])
    ref, fast = pair(spec, 4, 6, "lean", drop_path=0.2)
    fast.recompute = recompute
    x = torch.randn(2, 4, 10, 10)
    torch.manual_seed(3)
    with ByteCounter(keep_histogram=True) as counter:
        out = fast.train()(x)
    hist = counter.histogram
    assert hist["_embedding_bag_forward_only"] == len(fast.weighted_nodes)
    assert hist["addcmul_"] == 0 and hist["mul"] == 2  # none per input (2: DropPath's scaling)
    assert hist["native_batch_norm"] == spec.num_nodes  # each written into the buffer (out=)
    torch.manual_seed(3)
    assert torch.allclose(out, ref.train()(x), atol=1e-5, rtol=1e-5)
    fn, seen = out.grad_fn, set()
    while type(fn).__name__ != "_NodeFunctionBackward":  # a sink's node
        seen.add(fn)
        fn = next(f for f, _ in fn.next_functions if f is not None and f not in seen)
    tape = fn.call[3]
    assert tape.outputs is None and tape.table is None  # the forward's references, dropped
    buffer = fn.saved_tensors[5].untyped_storage()  # the node's output: a row of the buffer
    assert buffer.nbytes() == spec.num_nodes * out.numel() * 4
    del buffer
    with ByteCounter(keep_histogram=True) as counter:
        out.backward(torch.ones_like(out))
    if recompute:  # the sums again, from the buffer the backward kept
        assert counter.histogram["_embedding_bag_forward_only"] == len(fast.weighted_nodes)
    with pytest.raises(RuntimeError, match="freed"):
        fn.saved_tensors  # released with the backward, like any saved tensor


@pytest.mark.parametrize("recompute", [False, True])
def test_auto_executor_runs_the_reference_on_cpu_and_lean_on_cuda(monkeypatch, recompute):
    """"auto" (the default): the CPU runs the reference (faster there: benchmarks/README.md),
    a CUDA device lean; RECOMPUTE asks for lean's memory, so it runs lean on any device."""
    from randwire_d2.modeling import stage as stage_module

    spec = generate_graph("WS", 8, 0, **GENERATORS["WS"])
    stage = RandWireStage(spec, 4, 8, recompute=recompute)
    assert stage.executor == "auto"
    lean_calls = []
    real = stage_module.lean_forward
    monkeypatch.setattr(stage_module, "lean_forward", lambda s, x: lean_calls.append(x.device) or real(s, x))
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    stage(x).sum().backward()
    assert lean_calls == ([torch.device("cpu")] if recompute else [])
    resolve = stage_module.resolve_executor
    assert resolve("auto", recompute, torch.device("cuda", 0)) == "lean"
    assert resolve("auto", recompute, torch.device("cpu")) == ("lean" if recompute else "reference")
    assert resolve("lean", False, torch.device("cpu")) == "lean"
    assert resolve("reference", False, torch.device("cuda")) == "reference"
