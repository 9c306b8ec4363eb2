"""Your own datasets end to end: COCO-json and Pascal-VOC folders registered from the config
(DATASETS.COCO_JSON / DATASETS.VOC), trained and evaluated through tools/train_net.py
(also as two processes), class counts checked before any inference, tools/demo.py labels
with class names and skips a truncated JPEG, results are strict JSON."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

from randwire_d2.checkpoint import RandWireCheckpointer
from randwire_d2.data.custom import check_dataset_classes, load_voc_detection, register_custom_datasets
from randwire_d2.data.demo import DEMO_CLASSES, generate_demo_dataset
from randwire_d2.data.validation import DataError
from randwire_d2.engine import Trainer, setup, setup_cfg, train_net, write_results

from conftest import REPO


_spec = importlib.util.spec_from_file_location("randwire_tools_demo", os.path.join(REPO, "tools", "demo.py"))
demo_tool = importlib.util.module_from_spec(_spec)  # tools/demo.py (not the generic name "demo")
_spec.loader.exec_module(demo_tool)

CONFIG = os.path.join(REPO, "configs/custom/randwire_frcnn_finetune.yaml")
COCO_CLASSES = ["circle", "rectangle", "triangle"]  # the demo's first three, ids 10, 20, 30
# the fine-tuning config shrunk to a CPU-sized network and a few iterations
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.RANDWIRE.REGIME", "small", "MODEL.RANDWIRE.CHANNELS", "16",
    "MODEL.RANDWIRE.NODES", "6",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "SOLVER.AMP.ENABLED", "False", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001",
    "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "224",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "224", "DATALOADER.NUM_WORKERS", "0",
]


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not strict JSON")

    with open(path) as f:
        return json.loads(f.read(), parse_constant=refuse)


# --------------------------------------------------------------------------- data
def _coco_subset(src_json, dst_json, drop_classes=()):
    """A user-like COCO json: three classes with non-contiguous ids 10/20/30."""
    with open(src_json) as f:
        coco = json.load(f)
    keep = {i + 1: 10 * (i + 1) for i, c in enumerate(DEMO_CLASSES) if c in COCO_CLASSES and c not in drop_classes}
    coco["annotations"] = [dict(a, category_id=keep[a["category_id"]]) for a in coco["annotations"]
                           if a["category_id"] in keep]
    coco["categories"] = [{"id": 10 * (i + 1), "name": c} for i, c in enumerate(COCO_CLASSES)]
    with open(dst_json, "w") as f:
        json.dump(coco, f)
    return coco


def _write_voc(src_root, split, voc_root):
    """The demo split as a Pascal-VOC folder (1-based inclusive pixel boxes, as VOC's)."""
    with open(os.path.join(src_root, "annotations", f"{split}.json")) as f:
        coco = json.load(f)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(os.path.join(voc_root, sub), exist_ok=True)
    ids = []
    for im in coco["images"]:
        fileid = f"{split}_{im['id']:04d}"
        ids.append(fileid)
        shutil.copy(os.path.join(src_root, split, im["file_name"]), os.path.join(voc_root, "JPEGImages", fileid + ".jpg"))
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = fileid + ".jpg"
        size = ET.SubElement(root, "size")
        for k, v in (("width", im["width"]), ("height", im["height"]), ("depth", 3)):
            ET.SubElement(size, k).text = str(v)
        for a in coco["annotations"]:
            if a["image_id"] != im["id"]:
                continue
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = DEMO_CLASSES[a["category_id"] - 1]
            ET.SubElement(obj, "pose").text = "Unspecified"
            ET.SubElement(obj, "truncated").text = "0"
            ET.SubElement(obj, "difficult").text = "0"
            box = ET.SubElement(obj, "bndbox")
            x, y, w, h = a["bbox"]
            for k, v in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
                ET.SubElement(box, k).text = str(int(v))
        ET.ElementTree(root).write(os.path.join(voc_root, "Annotations", fileid + ".xml"))
    with open(os.path.join(voc_root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    return coco


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("custom")
    src = generate_demo_dataset(str(tmp / "demo"), num_train=6, num_val=6)
    coco_dir = tmp / "coco"
    os.makedirs(coco_dir / "annotations")
    shutil.copytree(os.path.join(src, "train"), coco_dir / "images")
    for i, f in enumerate(sorted(os.listdir(os.path.join(src, "val")))):
        shutil.copy(os.path.join(src, "val", f), coco_dir / "images" / f"val_{f}")
    _coco_subset(os.path.join(src, "annotations", "train.json"), coco_dir / "annotations" / "train.json")
    val = _coco_subset(os.path.join(src, "annotations", "val.json"), coco_dir / "annotations" / "val.json",
                       drop_classes=("triangle",))  # a class absent from val: its AP is NaN
    for im in val["images"]:
        im["file_name"] = "val_" + im["file_name"]
    with open(coco_dir / "annotations" / "val.json", "w") as f:
        json.dump(val, f)
    voc = tmp / "voc"
    _write_voc(src, "train", str(voc))
    voc_val = _write_voc(src, "val", str(voc))
    assert {a["category_id"] for a in voc_val["annotations"]} == set(range(1, 6))  # every class in val

    # "pretrained" detectors: the fine-tuning config's network, 5 classes (e.g. trained on
    # other data) and 3 classes (the COCO set's)
    weights = {}
    for n in (5, 3):
        cfg = setup_cfg(CONFIG, TINY + ["MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", str(n)])
        torch.manual_seed(n)
        model = build_model(cfg)
        RandWireCheckpointer(model, save_dir=str(tmp)).save(f"pretrained_{n}")
        weights[n] = str(tmp / f"pretrained_{n}.pth")
    coco_entries = [["mine_train", str(coco_dir / "annotations" / "train.json"), str(coco_dir / "images")],
                    ["mine_val", str(coco_dir / "annotations" / "val.json"), str(coco_dir / "images")]]
    voc_entries = [["mine_voc_train", str(voc), "train", list(DEMO_CLASSES)],
                   ["mine_voc_val", str(voc), "val", list(DEMO_CLASSES)]]
    return {"tmp": tmp, "coco": coco_entries, "voc": voc_entries, "voc_root": str(voc), "weights": weights,
            "coco_images": str(coco_dir / "images")}


def _coco_opts(data, out, num_classes=3, weights=None):
    return TINY + [
        "DATASETS.COCO_JSON", repr(data["coco"]), "DATASETS.TRAIN", "('mine_train',)",
        "DATASETS.TEST", "('mine_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes),
        "MODEL.WEIGHTS", weights or data["weights"][5], "OUTPUT_DIR", str(out),
    ]


# --------------------------------------------------------------------------- end to end
def test_coco_json_fine_tune_two_processes_through_train_net(data, tmp_path):
    """The command line alone (no wrapper script): two CPU processes each register the
    datasets, fine-tune from a 5-class detector, and COCOEvaluator scores the val set."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "tools/train_net.py", "--config-file", CONFIG, "--num-gpus", "2",
         *_coco_opts(data, out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "log.txt") as f:
        log = f.read()
    assert "World size: 2" in log
    # fine-tuning: all but the 5-class predictor is loaded
    skipped = {line.split("Skip loading parameter '")[1].split("'")[0]
               for line in log.splitlines() if "Skip loading parameter '" in line}
    assert "roi_heads.box_predictor.cls_score.weight" in skipped
    assert all(name.startswith("roi_heads.box_predictor.") for name in skipped), skipped
    results = _strict_json(out / "final_metrics.json")
    bbox = results["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-circle", "AP-rectangle", "AP-triangle"} <= set(bbox)
    assert bbox["AP-triangle"] is None  # absent from val: NaN in detectron2, null here
    assert all(v is None or 0.0 <= v <= 100.0 for v in bbox.values())


def test_voc_dataset_trains_and_evaluates_with_voc_evaluator(data, tmp_path):
    out = tmp_path / "out"
    opts = TINY + ["DATASETS.COCO_JSON", "[]", "DATASETS.VOC", repr(data["voc"]),
                   "DATASETS.TRAIN", "('mine_voc_train',)", "DATASETS.TEST", "('mine_voc_val',)",
                   "MODEL.ROI_HEADS.NUM_CLASSES", "5", "MODEL.WEIGHTS", data["weights"][5],
                   "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)]
    args = default_argument_parser().parse_args(["--config-file", CONFIG, *opts])
    train_net.main(args)
    results = _strict_json(out / "final_metrics.json")
    assert set(results["bbox"]) == {"AP", "AP50", "AP75"}  # PascalVOCDetectionEvaluator's
    assert all(0.0 <= v <= 100.0 for v in results["bbox"].values())


def test_voc_loader_matches_annotations_and_names_bad_files(data, tmp_path):
    dicts = load_voc_detection(data["voc_root"], "val", DEMO_CLASSES, "mine_voc_val")
    with open(os.path.join(data["tmp"], "demo", "annotations", "val.json")) as f:
        coco = json.load(f)
    assert len(dicts) == len(coco["images"])
    assert sum(len(d["annotations"]) for d in dicts) == len(coco["annotations"])
    first = [a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]]
    x, y, w, h = first[0]["bbox"]
    assert dicts[0]["annotations"][0]["bbox"] == [int(x + 1) - 1.0, int(y + 1) - 1.0, int(x + w), int(y + h)]
    assert dicts[0]["annotations"][0]["category_id"] == first[0]["category_id"] - 1
    with pytest.raises(DataError, match=r"val_\d+\.xml.*'circle'.*DATASETS.VOC"):
        load_voc_detection(data["voc_root"], "val", ["rectangle", "triangle", "cross", "star"], "x")
    with pytest.raises(DataError, match=r"ImageSets/Main/test\.txt"):
        load_voc_detection(data["voc_root"], "test", DEMO_CLASSES, "x")


# --------------------------------------------------------------------------- checks
def test_class_count_mismatch_refused_before_any_inference(data, tmp_path, monkeypatch):
    # command line: refused in setup, before the model is built
    opts = _coco_opts(data, tmp_path / "o", num_classes=5)
    args = default_argument_parser().parse_args(["--config-file", CONFIG, "--eval-only", *opts])
    with pytest.raises(ValueError, match=r"MODEL.ROI_HEADS.NUM_CLASSES = 5.*'mine_val' has 3 classes"):
        train_net.main(args)
    # a multi-process run says it once, before starting workers, without a traceback
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "tools/train_net.py", "--config-file", CONFIG, "--num-gpus", "2", *opts],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5, but dataset 'mine_train' has 3 classes" in proc.stderr
    # programmatic evaluation of a 5-class model on the 3-class val set: no inference runs
    cfg = setup_cfg(CONFIG, opts)
    model = build_model(cfg)
    cfg.defrost()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3  # the config agrees, the model does not
    import detectron2.engine.defaults as defaults

    monkeypatch.setattr(defaults, "inference_on_dataset", lambda *a, **k: pytest.fail("inference ran"))
    with pytest.raises(ValueError, match=r"model predicts 5 classes \(cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3\), but dataset 'mine_val' has 3"):
        Trainer.test(cfg, model)
    # the VOC class list counts too
    voc_cfg = setup_cfg(CONFIG, TINY + ["DATASETS.VOC", repr(data["voc"]), "MODEL.WEIGHTS", ""])
    with pytest.raises(ValueError, match=r"NUM_CLASSES = 3.*'mine_voc_val' has 5 classes"):
        check_dataset_classes(voc_cfg, ["mine_voc_val"])


def test_missing_datasets_named_with_hints(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./datasets here
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    weights = tmp_path / "model_final.pth"
    torch.save({}, weights)
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs/randwire_frcnn.yaml"), "--eval-only", "MODEL.WEIGHTS",
         str(weights), "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match=r"coco_2017_val.*instances_val2017\.json.*DETECTRON2_DATASETS"):
        setup(args)
    opts = ["DATASETS.COCO_JSON", repr([["gone_val", str(tmp_path / "nope.json"), str(tmp_path)]]),
            "DATASETS.TEST", "('gone_val',)"]
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, "--eval-only", *TINY, "MODEL.WEIGHTS", str(weights), *opts])
    with pytest.raises(FileNotFoundError, match=r"DATASETS.COCO_JSON\[0\].*nope\.json"):
        setup(args)
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, "--eval-only", *TINY, "MODEL.WEIGHTS", str(weights), "DATASETS.TEST", "('typo',)"])
    with pytest.raises(ValueError, match=r"'typo' is not registered.*DATASETS.COCO_JSON"):
        setup(args)


@pytest.mark.parametrize("key,entries,match", [
    ("COCO_JSON", [["only_name"]], r"COCO_JSON\[0\].*\[name, json_file, image_root\]"),
    ("COCO_JSON", [["coco_2017_val", "a.json", "imgs"]], r"'coco_2017_val' is already registered"),
    ("VOC", [["v", "dir", "train"]], r"VOC\[0\].*class names"),
    ("COCO_JSON", [["d", "a.json", "i"], ["d", "b.json", "i"]], r"COCO_JSON\[1\].*'d' is used twice"),
    ("VOC", [["v", "dir", "train", ["a", "a"]]], r"duplicates"),
])
def test_bad_dataset_entries(key, entries, match):
    with pytest.raises(ValueError, match=match):
        setup_cfg(CONFIG, [f"DATASETS.{key}", repr(entries)])


def test_reregistering_same_name_follows_the_config(data, tmp_path):
    cfg = setup_cfg(CONFIG, ["DATASETS.COCO_JSON", repr(data["coco"])])
    assert register_custom_datasets(cfg) == ["mine_train", "mine_val"]  # idempotent
    other = [["mine_val", str(tmp_path / "other.json"), str(tmp_path)]]
    setup_cfg(CONFIG, ["DATASETS.COCO_JSON", repr(other)])
    from detectron2.data import MetadataCatalog

    assert MetadataCatalog.get("mine_val").json_file == str(tmp_path / "other.json")
    setup_cfg(CONFIG, ["DATASETS.COCO_JSON", repr(data["coco"])])
    assert MetadataCatalog.get("mine_val").json_file == data["coco"][1][1]


def test_results_are_strict_json(tmp_path):
    path = write_results(str(tmp_path), {"bbox": {"AP": 12.5, "AP-x": float("nan"), "AP-y": float("inf")}})
    assert _strict_json(path) == {"bbox": {"AP": 12.5, "AP-x": None, "AP-y": None}}


# --------------------------------------------------------------------------- demo.py
def test_demo_labels_with_class_names_and_skips_truncated_jpeg(data, tmp_path, monkeypatch, randwire_logs):
    caplog = randwire_logs
    images = tmp_path / "in"
    os.makedirs(images)
    src = sorted(os.listdir(data["coco_images"]))[:2]
    for f in src:
        shutil.copy(os.path.join(data["coco_images"], f), images / f)
    good = open(images / src[0], "rb").read()
    (images / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])

    import detectron2.utils.visualizer as vis

    labels = []
    original = vis._create_text_labels

    def spy(*a, **k):
        out = original(*a, **k)
        labels.extend(out or [])
        return out

    monkeypatch.setattr(vis, "_create_text_labels", spy)
    opts = _coco_opts(data, tmp_path / "o", weights=data["weights"][3])
    rc = demo_tool.main(["--config-file", CONFIG, "--input", str(images), "--output", str(tmp_path / "vis"),
                         "--confidence-threshold", "0.0", "--opts", *opts])
    assert rc == 0
    assert sorted(os.listdir(tmp_path / "vis")) == sorted(os.path.splitext(f)[0] + ".png" for f in src)
    assert labels and all(label.split(" ")[0] in COCO_CLASSES for label in labels), labels[:5]
    assert "zz_truncated.jpg" in caplog.text and "skipping" in caplog.text
    # a model whose class count differs from the dataset's is refused, naming both
    opts = _coco_opts(data, tmp_path / "o", num_classes=5, weights=data["weights"][5])
    rc = demo_tool.main(["--config-file", CONFIG, "--input", str(images), "--output", str(tmp_path / "vis2"),
                         "--opts", *opts])
    assert rc == 2 and "MODEL.ROI_HEADS.NUM_CLASSES = 5" in caplog.text
