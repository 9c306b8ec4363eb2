"""configs/baselines/: detectron2's R50-FPN Faster R-CNN as twins of our detection configs.
A twin differs from its RandWire config only in the backbone keys, builds a real ResNet-50
FPN detector, and the demo twin trains through tools/train_net.py (2 iterations, tiny data)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from detectron2.config import CfgNode

from randwire_d2 import model_zoo
from randwire_d2.data.demo import generate_demo_dataset

from conftest import REPO

# baseline -> (its RandWire config, whether MODEL.WEIGHTS differs: pretrained starts)
TWINS = {
    "baselines/faster_rcnn_R_50_FPN_1x.yaml": ("randwire_frcnn.yaml", True),
    "baselines/faster_rcnn_R_50_FPN_demo.yaml": ("demo/randwire_frcnn_demo.yaml", False),
    "baselines/faster_rcnn_R_50_FPN_finetune.yaml": ("custom/randwire_frcnn_finetune.yaml", False),
}
BACKBONE_KEYS = ("MODEL.BACKBONE.NAME", "MODEL.RESNETS.", "MODEL.RANDWIRE.", "OUTPUT_DIR")


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("baseline", sorted(TWINS))
def test_twin_differs_only_in_backbone_keys(baseline):
    ours_name, other_weights = TWINS[baseline]
    base, ours = model_zoo.get_config(baseline), model_zoo.get_config(ours_name)
    skip = BACKBONE_KEYS + (("MODEL.WEIGHTS",) if other_weights else ())
    shared = lambda cfg: {k: v for k, v in _flat(cfg).items() if not k.startswith(skip)}  # noqa: E731
    a, b = shared(base), shared(ours)
    assert a.keys() == b.keys()
    assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {}
    # ...and the backbone keys say the same things about the ResNet as ours about RandWire
    assert base.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone" and base.MODEL.RESNETS.DEPTH == 50
    assert base.MODEL.RESNETS.OUT_FEATURES == ours.MODEL.RANDWIRE.OUT_FEATURES
    assert base.MODEL.RESNETS.NORM == ours.MODEL.RANDWIRE.NORM
    assert base.MODEL.RESNETS.STRIDE_IN_1X1 is False  # torchvision-style ResNet: RGB, ours' PIXEL_MEAN/STD
    assert base.OUTPUT_DIR != ours.OUTPUT_DIR
    if other_weights:
        assert base.MODEL.WEIGHTS != ours.MODEL.WEIGHTS
    else:
        assert base.MODEL.WEIGHTS == ""  # from scratch where ours is: nothing downloaded


@pytest.mark.parametrize("baseline", sorted(TWINS))
def test_baseline_builds_a_resnet50_fpn(baseline):
    model = model_zoo.get(baseline, device="cpu", weights="")
    bottom_up = model.backbone.bottom_up
    assert type(bottom_up).__name__ == "ResNet"
    assert [len(getattr(bottom_up, s)) for s in ("res2", "res3", "res4", "res5")] == [3, 4, 6, 3]
    n = sum(p.numel() for p in bottom_up.parameters())
    # ResNet-50 without its fc: 23.51M parameters, 23.45M with BN's affine as FrozenBN buffers
    assert 23.4e6 < n < 23.6e6, n
    cfg = model_zoo.get_config(baseline)
    assert model.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert list(model.backbone.in_features) == list(cfg.MODEL.FPN.IN_FEATURES)


def test_demo_twin_trains_through_train_net(tmp_path):
    root = generate_demo_dataset(str(tmp_path / "data"), num_train=4, num_val=2, seed=0)
    sets = [["bl_train", os.path.join(root, "annotations", "train.json"), os.path.join(root, "train")],
            ["bl_val", os.path.join(root, "annotations", "val.json"), os.path.join(root, "val")]]
    out = tmp_path / "out"
    opts = [
        "DATASETS.COCO_JSON", repr(sets), "DATASETS.TRAIN", "('bl_train',)", "DATASETS.TEST", "('bl_val',)",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "160", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "tools/train_net.py", "--config-file", "configs/baselines/faster_rcnn_R_50_FPN_demo.yaml",
         *opts], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "final_metrics.json") as f:
        bbox = json.load(f)["bbox"]
    assert {"AP", "AP50", "AP75"} <= set(bbox) and all(v is None or 0 <= v <= 100 for v in bbox.values())
    with open(out / "metrics.json") as f:
        iters = [r["iteration"] for r in map(json.loads, f) if "total_loss" in r]
    assert iters and max(iters) == 1  # iterations 0 and 1
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert state["model"]["backbone.bottom_up.res4.5.conv3.weight"].shape == (1024, 256, 1, 1)  # ResNet-50's
    assert state["iteration"] == 1
