"""tools/export_model.py: TorchScript and ONNX exports of a RandWire-FPN Faster R-CNN give
the eager model's boxes, classes and scores on real images (demo shapes and ImageNet JPEGs)."""
import glob
import importlib.util
import json
import os
import sys

import pytest
import torch

from detectron2.modeling import build_model

from randwire_d2 import export as E
from randwire_d2.checkpoint import RandWireCheckpointer
from randwire_d2.data.demo import generate_demo_dataset
from randwire_d2.engine import Trainer

from conftest import REPO, tiny_detection_cfg

sys.path.insert(0, os.path.join(REPO, "tools"))
import export_model  # noqa: E402

CONFIG = "configs/demo/randwire_frcnn_demo.yaml"
TINY = ["MODEL.RANDWIRE.NODES", 6, "INPUT.MIN_SIZE_TEST", 160, "INPUT.MAX_SIZE_TEST", 256]


def imagenet_jpegs():
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        return []
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "imagenet_*.jpg")))


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """A seeded tiny demo detector saved as a checkpoint, and real images to run it on."""
    tmp = tmp_path_factory.mktemp("export")
    root = generate_demo_dataset(str(tmp / "data"), num_train=1, num_val=3)
    images = sorted(glob.glob(os.path.join(root, "val", "*.jpg"))) + imagenet_jpegs()[9:11]  # 1024x683 among them
    cfg = tiny_detection_cfg(CONFIG, *TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    # distinct scores (an untrained classifier scores every box ~1/(K+1)): the comparison
    # then also checks the detections' order
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.05)
    weights = str(tmp / "model.pth")
    RandWireCheckpointer(model, save_dir=str(tmp)).save("model")
    val = [["export_val", os.path.join(root, "annotations", "val.json"), os.path.join(root, "val")]]
    return weights, images, tmp, val


def _opts(weights):
    """tiny_detection_cfg's overrides as command-line opts."""
    return [
        "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu", "MODEL.RANDWIRE.CHANNELS", "16",
        "MODEL.RANDWIRE.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.FPN.OUT_CHANNELS", "32",
        "SOLVER.AMP.ENABLED", "False", *[str(x) for x in TINY],
    ]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager_on_real_images(demo_model, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    weights, images, _, val = demo_model
    out = str(tmp_path / fmt)
    argv = ["--config-file", os.path.join(REPO, CONFIG), "--format", fmt, "--sample-image", images[0],
            "--output", out]
    for p in images[1:]:
        argv += ["--check-image", p]
    data = ["DATASETS.COCO_JSON", repr(val), "DATASETS.TEST", "('export_val',)", "OUTPUT_DIR", str(tmp_path)]
    assert export_model.main(argv + ["--run-eval"] + _opts(weights) + data) == 0
    model_file = os.path.join(out, E.MODEL_FILES[fmt])
    if fmt == "onnx":  # standard ONNX operators only (no custom domain)
        onnx = pytest.importorskip("onnx")
        assert {n.domain for n in onnx.load(model_file).graph.node} <= {"", "ai.onnx"}
    else:  # no Python ops (custom autograd Functions) in the graph
        graph = str(torch.jit.load(model_file).inlined_graph)
        assert "prim::PythonOp" not in graph and "convolution" in graph

    # independently of the tool's own check: a fresh eager model from the same weights
    cfg = tiny_detection_cfg(CONFIG, *TINY, "MODEL.WEIGHTS", weights)
    model = E.build_inference_model(cfg)
    exported = E.ExportedDetector(out)
    assert exported.info["thing_classes"] == ["circle", "rectangle", "triangle", "cross", "star"]
    sizes = set()
    for path in images:
        sample = E.preprocess(cfg, E.read_image(cfg, path))
        sizes.add(tuple(sample["image"].shape[1:]))
        with torch.no_grad():
            ref = model([sample])[0]["instances"]
        got = exported([sample])[0]["instances"]
        assert len(ref) > 0 and len(got) == len(ref), path
        assert got.image_size == (sample["height"], sample["width"])
        assert torch.equal(got.pred_classes, ref.pred_classes)
        torch.testing.assert_close(got.pred_boxes.tensor, ref.pred_boxes.tensor, atol=1e-3, rtol=0)
        torch.testing.assert_close(got.scores, ref.scores, atol=1e-5, rtol=0)
        assert float(ref.scores.max() - ref.scores.min()) > 1e-3  # scores differ: order is checked
    assert len(sizes) >= 3  # traced once, run on other input sizes

    # --run-eval went through detectron2's test loader and COCOEvaluator: its predictions
    # (original image coordinates) are the eager model's
    eval_dir = str(tmp_path / "eager")
    cfg = tiny_detection_cfg(CONFIG, *TINY, "MODEL.WEIGHTS", weights, *data[:-2], "OUTPUT_DIR", eval_dir)
    eager = Trainer.test(cfg, model)
    with open(os.path.join(out, "final_metrics.json")) as f:
        assert json.load(f).keys() == eager.keys() == {"bbox"}
    with open(tmp_path / "inference_exported" / "coco_instances_results.json") as f1, \
            open(os.path.join(eval_dir, "inference", "coco_instances_results.json")) as f2:
        got, ref = json.load(f1), json.load(f2)
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref):
        assert (g["image_id"], g["category_id"]) == (r["image_id"], r["category_id"])
        assert max(abs(a - b) for a, b in zip(g["bbox"], r["bbox"])) < 1e-3 and abs(g["score"] - r["score"]) < 1e-5


def test_export_uses_reference_executor(demo_model):
    weights, _, _, _ = demo_model
    cfg = tiny_detection_cfg(CONFIG, *TINY, "MODEL.WEIGHTS", weights)
    model = E.build_inference_model(cfg)
    stages = [m for m in model.modules() if hasattr(m, "executor") and hasattr(m, "graph")]
    assert stages and all(m.executor == "reference" for m in stages)
    assert not model.training


def test_export_bad_input_named(demo_model, tmp_path, randwire_logs):
    caplog = randwire_logs
    weights, images, tmp, _ = demo_model
    base = ["--config-file", os.path.join(REPO, CONFIG), "--output", str(tmp_path / "o")]
    opts = _opts(weights)
    i = opts.index("MODEL.WEIGHTS")
    missing = opts[:i] + ["MODEL.WEIGHTS", str(tmp / "nope.pth")] + opts[i + 2:]
    assert export_model.main(base + ["--sample-image", images[0]] + missing) == 2
    assert "MODEL.WEIGHTS" in caplog.text and "nope.pth" in caplog.text
    caplog.clear()
    assert export_model.main(base + ["--sample-image", str(tmp / "none.jpg")] + opts) == 2
    assert "none.jpg" in caplog.text and "no such file" in caplog.text
    caplog.clear()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(open(images[0], "rb").read()[:300])
    assert export_model.main(base + ["--sample-image", str(broken)] + opts) == 2
    assert "broken.jpg" in caplog.text
    caplog.clear()
    assert export_model.main(base + ["--format", "onnx", "--opset", "11", "--sample-image", images[0]] + opts) == 2
    assert "--opset 11" in caplog.text and ">= 16" in caplog.text
    with pytest.raises(E.ExportError, match="export_info.json"):
        E.ExportedDetector(str(tmp_path / "empty"))
