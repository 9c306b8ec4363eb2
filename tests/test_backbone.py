"""detectron2 integration: registered builders, shapes, padding, freezing, Faster R-CNN."""
import subprocess
import sys

import pytest
import torch

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from conftest import REPO, tiny_detection_cfg

BUILDERS = {
    "build_randwire_backbone": ["res2", "res3", "res4", "res5"],
    "build_randwire_fpn_backbone": ["p2", "p3", "p4", "p5", "p6"],
    "build_randwire_retinanet_fpn_backbone": ["p3", "p4", "p5", "p6", "p7"],
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("size", [(97, 131), (224, 150)])
def test_builders_output_shape_matches_features(name, size):
    opts = ["MODEL.BACKBONE.NAME", name]
    if "retinanet" in name:
        opts += ["MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"]]
    cfg = tiny_detection_cfg("configs/randwire_frcnn.yaml", *opts)
    backbone = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    shapes = backbone.output_shape()
    assert sorted(shapes) == BUILDERS[name]
    # pad like GeneralizedRCNN does, then every level is exactly H/stride
    images = ImageList.from_tensors([torch.randn(3, *size)], backbone.size_divisibility)
    h, w = images.tensor.shape[-2:]
    assert h % 32 == 0 and w % 32 == 0 and (h, w) != size
    feats = backbone(images.tensor)
    for key, spec in shapes.items():
        # p6/p7 (stride 64/128) round up; strides 4..32 divide the padded size exactly
        assert feats[key].shape == (1, spec.channels, -(-h // spec.stride), -(-w // spec.stride)), key
    if name == "build_randwire_backbone":
        assert [shapes[k].stride for k in BUILDERS[name]] == [4, 8, 16, 32]
        # regular regime, C=16 (paper Table 1): C, 2C, 4C, 8C
        assert [feats[k].shape[1] for k in BUILDERS[name]] == [16, 32, 64, 128]
    else:
        assert all(feats[k].shape[1] == 32 for k in BUILDERS[name])  # MODEL.FPN.OUT_CHANNELS


def test_generalized_rcnn_pads_to_size_divisibility():
    cfg = tiny_detection_cfg()
    model = build_model(cfg).eval()
    assert model.backbone.size_divisibility == 32
    images = model.preprocess_image([{"image": torch.zeros(3, 97, 131)}])
    assert tuple(images.tensor.shape[-2:]) == (128, 160)
    assert images.image_sizes[0] == (97, 131)


def test_freeze_at_freezes_exactly_stem_and_stages():
    for freeze_at, frozen in [(0, set()), (1, {"stem"}), (2, {"stem", "res2"}), (4, {"stem", "res2", "res3", "res4"})]:
        cfg = tiny_detection_cfg("configs/randwire_frcnn.yaml", "MODEL.BACKBONE.FREEZE_AT", freeze_at)
        bottom_up = build_backbone(cfg, ShapeSpec(channels=3)).bottom_up
        got = {n.split(".")[0] for n, p in bottom_up.named_parameters() if not p.requires_grad}
        assert got == frozen, freeze_at
        assert all(p.requires_grad for n, p in bottom_up.named_parameters() if n.split(".")[0] not in frozen)
        frozen_norms = {n.split(".")[0] for n, m in bottom_up.named_modules() if isinstance(m, FrozenBatchNorm2d)}
        assert frozen_norms == frozen


@pytest.mark.parametrize("norm", ["BN", "FrozenBN", "GN", "SyncBN"])
def test_norm_variants_build(norm):
    cfg = tiny_detection_cfg("configs/randwire_frcnn.yaml", "MODEL.RANDWIRE.NORM", norm, "MODEL.RANDWIRE.CHANNELS", 64)
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    if norm != "SyncBN":  # SyncBN runs only in a distributed GPU job
        backbone.train()
        out = backbone(torch.randn(2, 3, 64, 64))
        assert out["p2"].shape == (2, 32, 16, 16)


def _synthetic_batch():
    inst = Instances((120, 150))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 30.0, 140.0, 100.0]]))
    inst.gt_classes = torch.tensor([0, 1])
    return [{"image": torch.randint(0, 255, (3, 120, 150), dtype=torch.uint8), "instances": inst, "height": 120, "width": 150}]


def test_faster_rcnn_train_step_and_inference():
    torch.manual_seed(0)
    cfg = tiny_detection_cfg("configs/randwire_frcnn.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", 2)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(_synthetic_batch())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.bottom_up.stem.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 120, 150), dtype=torch.uint8)}])
    inst = out[0]["instances"]
    assert inst.image_size == (120, 150)
    assert inst.pred_boxes.tensor.shape[1] == 4 and len(inst) == len(inst.scores)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("MODEL.RANDWIRE.REGIME", "huge", "MODEL.RANDWIRE.REGIME"),
        ("MODEL.RANDWIRE.GENERATOR", "XX", "MODEL.RANDWIRE.GENERATOR"),
        ("MODEL.RANDWIRE.WS_K", 3, "MODEL.RANDWIRE.WS_K"),
        ("MODEL.RANDWIRE.WS_P", 1.5, "MODEL.RANDWIRE.WS_P"),
        ("MODEL.RANDWIRE.NORM", "LN", "MODEL.RANDWIRE.NORM"),
        ("MODEL.RANDWIRE.OUT_FEATURES", ["res9"], "MODEL.RANDWIRE.OUT_FEATURES"),
        ("MODEL.RANDWIRE.DROP_PATH", 1.0, "MODEL.RANDWIRE.DROP_PATH"),
        ("MODEL.RANDWIRE.NODES", 2, "MODEL.RANDWIRE.NODES"),
        ("MODEL.RANDWIRE.GRAPHS_FILE", "/nonexistent/graphs.json", "GRAPHS_FILE"),
        ("MODEL.FPN.IN_FEATURES", ["res1"], "MODEL.FPN.IN_FEATURES"),
    ],
)
def test_bad_randwire_values_name_the_key(key, value, match):
    cfg = tiny_detection_cfg("configs/randwire_frcnn.yaml", key, value)
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


def test_typo_in_config_key_is_refused():
    # yacs: KeyError from a yaml file, AssertionError from command-line opts
    with pytest.raises((KeyError, AssertionError), match="Non-existent"):
        tiny_detection_cfg("configs/randwire_frcnn.yaml", "MODEL.RANDWIRE.CHANELS", 8)


def test_import_twice_and_registration():
    code = (
        "import importlib, randwire_d2, randwire_d2.modeling.backbone as b;"
        "importlib.reload(b); importlib.reload(randwire_d2);"
        "from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY;"
        "from detectron2.data import DatasetCatalog;"
        "assert BACKBONE_REGISTRY.get('build_randwire_fpn_backbone');"
        "assert META_ARCH_REGISTRY.get('RandWireClassifier');"
        "assert 'randwire_demo_train' in DatasetCatalog.list(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    for name in BUILDERS:
        assert BACKBONE_REGISTRY.get(name)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.RANDWIRE.CHANELS", "8"], "Non-existent config key: MODEL.RANDWIRE.CHANELS"),
        (["MODEL.RANDWIRE.WS_K", "3"], "MODEL.RANDWIRE.WS_K"),
        (["MODEL.WEIGHTS", "/nonexistent/w.pkl"], "cfg.MODEL.WEIGHTS = '/nonexistent/w.pkl': no such file"),
    ],
)
def test_train_net_reports_bad_input_without_traceback(opts, message, tmp_path):
    cmd = [sys.executable, "tools/train_net.py", "--config-file", "configs/demo/randwire_frcnn_demo.yaml",
           "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "1", *opts]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and message in out.stderr, out.stderr[-2000:]
