"""tools/analyze_model.py, randwire_d2.analysis and tools/visualize_graph.py on tiny networks.

(The paper-complexity check for C=78 lives in test_modeling.py.)
"""
import importlib.util
import json
import os

import pytest
import torch

from randwire_d2.analysis import (
    build_analysis_model,
    complexity,
    load_config,
    network_generator_stats,
)
from randwire_d2.graphs import specs_to_dict
from randwire_d2.modeling.stage import EXECUTORS
from randwire_d2.modeling.network import RandWireNet, build_graph_specs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLS_CONFIG = os.path.join(REPO, "configs/imagenet/randwire_ws_small_c78.yaml")
DET_CONFIG = os.path.join(REPO, "configs/randwire_frcnn.yaml")
TINY = ["MODEL.RANDWIRE.CHANNELS", "16", "MODEL.RANDWIRE.NODES", "8", "MODEL.RANDWIRE.NUM_CLASSES", "10"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cls_config():
    return CLS_CONFIG


def test_analyze_model_json_fields(tmp_path, capsys):
    out = tmp_path / "stats.json"
    _tool("analyze_model").main(
        ["--config-file", _cls_config(), "--num-seeds", "2", "--input-size", "64", "--json", str(out), *TINY]
    )
    printed = capsys.readouterr().out
    assert "FLOPs (MAdd)" in printed and "±" in printed and "res5" in printed
    data = json.loads(out.read_text())
    assert data["config"] == _cls_config() and data["num_seeds"] == 2 and data["seeds"] == [0, 1]
    assert data["input_size"] == [64, 64] and data["model"] == "classifier"
    for key in ("params", "flops", "activations"):
        stats = data[key]
        assert set(stats) >= {"mean", "std", "values"}
        assert len(stats["values"]) == 2 and all(v > 0 for v in stats["values"])
        assert stats["mean"] == pytest.approx(sum(stats["values"]) / 2) and stats["std"] >= 0
    # The parts (stem, res2..res5, head) cover the whole network.
    per_stage = data["per_stage"]
    assert list(per_stage) == ["stem", "res2", "res3", "res4", "res5", "head"]
    for key in ("params", "flops", "activations"):
        assert sum(p[key] for p in per_stage.values()) == data[key]["values"][0]
    assert per_stage["res3"]["nodes"] == 8 and per_stage["res3"]["generator"] == "WS"
    assert "nodes" not in per_stage["res2"]  # small regime: res2 is a plain conv
    # Stem by hand: 3x3 conv 3 -> C/2=8 channels, stride 2 (32x32 out), plus eval BN (2 per element).
    assert per_stage["stem"]["flops"] == 32 * 32 * 8 * 27 + 2 * 8 * 32 * 32
    assert per_stage["stem"]["params"] == 8 * 27 + 2 * 8
    # Head: 1x1 conv 64 -> 1280 (2x2 at 64 px) ... FC 1280 -> 10; params independent of size.
    assert per_stage["head"]["params"] == 64 * 1280 + 2 * 1280 + 1280 * 10 + 10


def _stage_by_hand(spec, cin, cout, hw):
    """(params, fvcore FLOPs) of a wired stage from its edge list: per node sigmoid weights
    (k > 1 inputs), 3x3 depthwise on its input width, 1x1 to cout, BN (2 params; eval BN
    2 FLOPs per element). Weighted sums and the sink mean are element-wise: not counted."""
    params = flops = 0
    for preds in spec.predecessors:
        c = cout if preds else cin
        params += (len(preds) if len(preds) > 1 else 0) + 9 * c + c * cout + 2 * cout
        flops += hw * (9 * c + c * cout + 2 * cout)
    return params, flops


def test_parameters_counted_by_hand_from_the_paper_ops():
    cfg = load_config(_cls_config(), TINY + ["MODEL.RANDWIRE.SEED", "5"])
    model = build_analysis_model(cfg)
    assert isinstance(model, RandWireNet) and model.head is not None and not model.training
    result = complexity(model, (64, 96))
    assert result["input_size"] == [64, 96]
    # small regime, C=16: stem 8, conv2 16, res3..res5 16, 32, 64 channels; head 1280 -> 10
    expected = 3 * 9 * 8 + 2 * 8 + 8 * 9 * 16 + 2 * 16
    for name, cin, cout in (("res3", 16, 16), ("res4", 16, 32), ("res5", 32, 64)):
        params, _ = _stage_by_hand(model.graph_specs[name], cin, cout, 1)
        assert result["per_stage"][name]["params"] == params, name
        expected += params
    expected += 64 * 1280 + 2 * 1280 + 1280 * 10 + 10
    assert result["params"] == expected


def test_generator_stats_vary_over_seeds():
    """Different seeds give different WS graphs, hence a spread in params and FLOPs."""
    cfg = load_config(_cls_config(), TINY)
    stats = network_generator_stats(cfg, 3, 64)
    assert stats["seeds"] == [0, 1, 2]
    assert len(set(stats["flops"]["values"])) > 1 and stats["flops"]["std"] > 0
    assert stats["params"]["std"] > 0


def test_detection_config_counts_bottom_up_backbone():
    cfg = load_config(DET_CONFIG, ["MODEL.RANDWIRE.CHANNELS", "16", "MODEL.RANDWIRE.NODES", "10"])
    stats = network_generator_stats(cfg, 1, 64)
    assert stats["model"] == "backbone" and stats["num_seeds"] == 1
    assert list(stats["per_stage"]) == ["stem", "res2", "res3", "res4", "res5"]
    assert stats["per_stage"]["res2"]["nodes"] == 5  # regular regime: conv2 wired with N/2 nodes


@pytest.mark.parametrize("executor", EXECUTORS)
def test_stage_flops_counted_by_hand_on_every_executor(executor):
    """The paper's FLOPs whatever executor the model runs (fvcore does not trace into the
    lean executor's autograd Functions), and the model keeps its executor afterwards."""
    graphs = build_graph_specs("small", 8, "WS", {"k": 4, "p": 0.75}, 0)
    net = RandWireNet(regime="small", channels=16, graphs=graphs, num_classes=10, executor=executor)
    result = complexity(net, 64)
    for name, cin, cout, side in (("res3", 16, 16, 8), ("res4", 16, 32, 4), ("res5", 32, 64, 2)):
        params, flops = _stage_by_hand(graphs[name], cin, cout, side * side)
        assert (result["per_stage"][name]["params"], result["per_stage"][name]["flops"]) == (params, flops)
    assert all(s.executor == executor for s in (net.res3, net.res4, net.res5))  # restored


# ----------------------------------------------------------------------------- visualize_graph
def _check_image(path, ext):
    data = open(path, "rb").read()
    assert len(data) > 1000
    if ext == ".png":
        assert data.startswith(b"\x89PNG")
    else:
        assert b"<svg" in data[:2000]


@pytest.mark.parametrize("ext", [".png", ".svg"])
def test_visualize_from_config(tmp_path, ext, capsys):
    out = str(tmp_path / f"graphs{ext}")
    paths = _tool("visualize_graph").main(
        ["--config-file", DET_CONFIG, "--output", out, "MODEL.RANDWIRE.NODES", "10"]
    )
    assert paths == [out]
    _check_image(out, ext)
    printed = capsys.readouterr().out
    assert "res2: WS(K=4, P=0.75)" in printed and "10 nodes" in printed


def test_visualize_from_json_and_checkpoint(tmp_path):
    tool = _tool("visualize_graph")
    specs = build_graph_specs("small", 8, "ER", {"p": 0.4}, 3)
    js = tmp_path / "specs.json"
    js.write_text(json.dumps(specs_to_dict(specs)))
    paths = tool.main(["--graphs-json", str(js), "--output", str(tmp_path / "g.svg"), "--per-stage"])
    assert paths == [str(tmp_path / f"g_{s}.svg") for s in ("res3", "res4", "res5")]
    for p in paths:
        _check_image(p, ".svg")
    ckpt = tmp_path / "model.pth"
    torch.save({"model": {}, "randwire_graphs": specs_to_dict(specs)}, ckpt)
    out = str(tmp_path / "ckpt.png")
    assert tool.main(["--checkpoint", str(ckpt), "--output", out, "--stages", "res4"]) == [out]
    _check_image(out, ".png")


def test_layout_follows_depth():
    tool = _tool("visualize_graph")
    spec = build_graph_specs("small", 8, "WS", {"k": 4, "p": 0.75}, 1)["res3"]
    pos = tool.layout(spec)
    depths = spec.depths
    for v in range(spec.num_nodes):
        assert pos[v][0] == depths[v] + 1
    assert pos[tool.INPUT][0] == 0 and pos[tool.OUTPUT][0] == max(depths) + 2
    assert len({pos[v] for v in range(spec.num_nodes)}) == spec.num_nodes  # no overlaps
    with pytest.raises(ValueError, match="output"):
        tool.draw_graph_specs({"res3": spec}, str("graphs.jpg"))
