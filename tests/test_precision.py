"""Precision and memory format (randwire_d2/engine/precision.py, MODEL.RANDWIRE.MEMORY_FORMAT): channels_last equals NCHW, bf16 autocast
of the lean executor is as close to fp32 as the reference's, PrecisionTrainer trains in the
precision it is given, and bad settings name their key."""
import copy

import pytest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from randwire_d2.config import add_randwire_config, randwire_kwargs
from randwire_d2.modeling.network import RandWireNet, build_graph_specs
from randwire_d2.modeling.stage import RandWireStage, set_executor
from randwire_d2.config import resolve_channels_last
from randwire_d2.engine.precision import PrecisionTrainer, resolve_precision

from conftest import perturb_


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def tiny_net(executor="lean", channels_last=False, drop_path=0.2):
    graphs = build_graph_specs("regular", 12, "WS", {"k": 4, "p": 0.75}, 0)
    torch.manual_seed(0)
    net = RandWireNet(regime="regular", channels=8, graphs=graphs, num_classes=5, drop_path=drop_path,
                      executor=executor, channels_last=channels_last)
    return perturb_(net)


def step(net, x, seed=3):
    """One training forward + backward: (logits, input gradient, parameter gradients)."""
    net.train().zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # DropPath masks
    logits = net(x)["linear"]
    F.cross_entropy(logits.float(), torch.arange(x.shape[0]) % 5).backward()
    return logits.detach(), x.grad, {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("executor", ["lean", "reference"])
def test_channels_last_equals_nchw_and_stays_channels_last(executor):
    # float64: summation order (which the layout changes) leaves no trace at 1e-10
    nchw = tiny_net(executor).double()
    nhwc = tiny_net(executor, channels_last=True).double()
    nhwc.load_state_dict(nchw.state_dict())
    assert nhwc.res3.nodes[3].conv_pw.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    for name in ("stem", "res2", "res3", "res4", "res5"):
        getattr(nhwc, name).register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(3, 3, 64, 48, dtype=torch.float64)  # an NCHW input: the network converts it
    out_a, gx_a, gp_a = step(nchw, x)
    out_b, gx_b, gp_b = step(nhwc, x)
    assert seen and all(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous() for o in seen)
    assert rel_err(out_a, out_b) < 1e-10 and rel_err(gx_a, gx_b) < 1e-10
    assert gp_a.keys() == gp_b.keys()
    for name in gp_a:
        assert rel_err(gp_a[name], gp_b[name]) < 1e-10, name
    if executor == "lean":  # and equal to the reference in channels_last
        ref = tiny_net("reference", channels_last=True).double()
        ref.load_state_dict(nchw.state_dict())
        out_r, gx_r, gp_r = step(ref, x)
        assert rel_err(out_r, out_b) < 1e-10 and rel_err(gx_r, gx_b) < 1e-10
        assert all(rel_err(gp_r[n], gp_b[n]) < 1e-10 for n in gp_r)


def test_bf16_training_step_of_lean_is_as_close_to_fp32_as_the_reference():
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = tiny_net("reference")
    lean = set_executor(copy.deepcopy(ref), "lean")
    exact = step(copy.deepcopy(ref), x)
    results = {}
    for name, net in (("reference", ref), ("lean", lean)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[name] = step(net, x)
    for i in (0, 1):  # logits, input gradient
        err = {n: rel_err(exact[i], r[i]) for n, r in results.items()}
        assert 0 < err["lean"] < 1.5 * err["reference"] + 5e-3, (i, err)
    mean = {n: sum(rel_err(exact[2][k], r[2][k]) for k in exact[2]) / len(exact[2]) for n, r in results.items()}
    assert mean["lean"] < 1.3 * mean["reference"] + 5e-3, mean


class _Recorder(torch.nn.Module):
    """A model for SimpleTrainer: records the autocast state its forward runs under."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.seen = []

    def forward(self, data):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return {"loss": self.lin(data).float().pow(2).mean()}


@pytest.mark.parametrize("precision,dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_trainer_runs_the_forward_in_its_precision(precision, dtype):
    model = _Recorder()
    data = iter([torch.randn(8, 4)] * 3)
    trainer = PrecisionTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1), precision, "cpu")
    before = model.lin.weight.detach().clone()
    trainer.iter = 0
    with EventStorage(0):
        trainer.run_step()
    enabled, seen_dtype = model.seen[-1]
    assert enabled == (dtype is not None)
    if dtype is not None:
        assert seen_dtype == dtype
    if precision == "fp16" and torch.equal(before, model.lin.weight):
        assert trainer.grad_scaler.get_scale() < 2.0**16  # overflow at the first scale: step skipped
    else:
        assert not torch.equal(before, model.lin.weight)  # the step updated the weights
    assert ("grad_scaler" in trainer.state_dict()) == (precision == "fp16")
    assert not torch.is_autocast_enabled("cpu")  # backward and the update run outside autocast


def _cfg(**settings):
    cfg = add_randwire_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    for key, value in settings.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def test_settings_resolve_and_bad_values_name_their_key():
    assert resolve_precision(_cfg()) == "fp32"  # auto on CPU
    assert resolve_precision(_cfg(**{"SOLVER.AMP.ENABLED": True})) == "fp32"
    for value in ("fp32", "bf16", "fp16"):
        assert resolve_precision(_cfg(**{"SOLVER.AMP.PRECISION": value})) == value
    with pytest.raises(ValueError, match=r"cfg.SOLVER.AMP.PRECISION = 'half' is invalid: allowed are \['auto'"):
        resolve_precision(_cfg(**{"SOLVER.AMP.PRECISION": "half"}))
    assert resolve_channels_last("auto", "cpu") is False and resolve_channels_last("auto", "cuda:0") is True
    assert resolve_channels_last("channels_last", "cpu") is True
    assert resolve_channels_last("contiguous", "cuda") is False
    cfg = _cfg(**{"MODEL.RANDWIRE.CHANNELS": 8, "MODEL.RANDWIRE.NODES": 12})
    assert randwire_kwargs(cfg)["channels_last"] is False
    cfg.MODEL.RANDWIRE.MEMORY_FORMAT = "nhwc"
    with pytest.raises(ValueError, match=r"cfg.MODEL.RANDWIRE.MEMORY_FORMAT = 'nhwc' is invalid"):
        randwire_kwargs(cfg)


def test_lean_stage_in_channels_last_with_the_grouped_input_level():
    """The input level's grouped depthwise backward interleaves NHWC gradients itself."""
    from randwire_d2.graphs import generate_graph

    spec = generate_graph("WS", 10, 1, k=4, p=0.75)
    torch.manual_seed(0)
    ref = perturb_(RandWireStage(spec, 6, 8, drop_path=0.3, executor="reference"))
    ref, lean = ref.double(), set_executor(copy.deepcopy(ref), "lean").double().to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 12, 10, dtype=torch.float64)
    grads = []
    for stage, inp in ((ref, x), (lean, x.contiguous(memory_format=torch.channels_last))):
        inp = inp.clone().requires_grad_()
        torch.manual_seed(1)
        out = stage.train()(inp)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), inp.grad, {n: p.grad for n, p in stage.named_parameters()}))
    assert grads[1][0].is_contiguous(memory_format=torch.channels_last)
    assert rel_err(grads[0][0], grads[1][0]) < 1e-10 and rel_err(grads[0][1], grads[1][1]) < 1e-10
    for name in grads[0][2]:
        assert rel_err(grads[0][2][name], grads[1][2][name]) < 1e-10, name
