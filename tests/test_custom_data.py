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
    voc_cfg = setup_cfg(CONFIG, TINY + ["DATASETS.VOC", repr(data["voc"]), "MODEL.WEIGHTS", "",
                                        "MODEL.ROI_HEADS.NUM_CLASSES", "3"])
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


# --------------------------------------------------------------------------- silent wrongs (issue 19)
def _eval_args(data, out, weights, *flags, num_classes=3, **extra):
    opts = _coco_opts(data, out, num_classes=num_classes, weights=weights)
    for k, v in extra.items():
        opts += [k, v]
    return default_argument_parser().parse_args(["--config-file", CONFIG, "--eval-only", *flags, *opts])


def _save_with_classes(data, tmp_path, n, class_names):
    """The n-class "pretrained" detector, re-saved recording ``class_names``."""
    cfg = setup_cfg(CONFIG, TINY + ["MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", str(n)])
    model = build_model(cfg)
    RandWireCheckpointer(model).load(data["weights"][n])
    RandWireCheckpointer(model, save_dir=str(tmp_path), class_names=class_names).save(f"named_{n}")
    return str(tmp_path / f"named_{n}.pth")


def test_eval_only_refuses_weights_of_other_classes(data, tmp_path, monkeypatch):
    """Evaluation loads every tensor: a 5-class checkpoint on a 3-class model is refused naming
    both counts (not scored with a random classifier); recorded class names are checked."""
    import detectron2.engine.defaults as defaults

    monkeypatch.setattr(defaults, "inference_on_dataset", lambda *a, **k: pytest.fail("inference ran"))
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"pretrained_5\.pth was trained for 5 classes, the model predicts 3 .*"
                                         r"evaluation and inference need every tensor"):
        train_net.main(_eval_args(data, out, data["weights"][5]))
    named = _save_with_classes(data, tmp_path, 3, ["tree", "bush", "rock"])
    with pytest.raises(ValueError, match=r"trained on the classes \['tree', 'bush', 'rock'\], but dataset 'mine_val' "
                                         r"\(cfg.DATASETS.TEST\) has \['circle', 'rectangle', 'triangle'\]"):
        train_net.main(_eval_args(data, out, named))
    with pytest.raises(ValueError, match=r"--eval-only with an empty cfg.MODEL.WEIGHTS"):
        train_net.main(_eval_args(data, out, "", **{"MODEL.WEIGHTS": ""}))
    assert not os.path.exists(out / "final_metrics.json")


def test_eval_only_writes_beside_a_training_and_records_the_weights(data, tmp_path):
    from randwire_d2.engine.provenance import file_sha256

    out = tmp_path / "run"
    train_net.main(default_argument_parser().parse_args(
        ["--config-file", CONFIG, *_coco_opts(data, out, weights=data["weights"][5])]))
    final = str(out / "model_final.pth")
    trained = _strict_json(out / "final_metrics.json")
    assert trained["weights"] == {"path": final, "sha256": file_sha256(final)}
    assert torch.load(final, weights_only=False)["class_names"] == COCO_CLASSES  # recorded for later checks
    before = {f: (out / f).read_bytes() for f in ("final_metrics.json", "config.yaml")}

    train_net.main(_eval_args(data, out, data["weights"][3]))
    sha = file_sha256(data["weights"][3])
    evaluated = _strict_json(out / f"eval_pretrained_3_{sha[:8]}" / "final_metrics.json")
    assert evaluated["weights"] == {"path": data["weights"][3], "sha256": sha}
    assert set(evaluated["bbox"]) == set(trained["bbox"])
    assert {f: (out / f).read_bytes() for f in before} == before  # the training's files are untouched
    # --resume: the training's own last checkpoint, beside as well
    train_net.main(_eval_args(data, out, data["weights"][3], "--resume"))
    again = _strict_json(out / f"eval_model_final_{file_sha256(final)[:8]}" / "final_metrics.json")
    assert again["weights"]["path"] == final and again["bbox"] == trained["bbox"]


def test_demo_refuses_weights_of_other_classes_and_labels_with_recorded_names(data, tmp_path, monkeypatch,
                                                                              randwire_logs):
    images = tmp_path / "in"
    os.makedirs(images)
    shutil.copy(os.path.join(data["coco_images"], sorted(os.listdir(data["coco_images"]))[0]), images / "a.jpg")
    # a 3-class checkpoint in a 5-class (VOC demo classes) config: the same fit check as training
    opts = TINY + ["DATASETS.VOC", repr(data["voc"]), "DATASETS.TRAIN", "('mine_voc_train',)",
                   "DATASETS.TEST", "('mine_voc_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", "5",
                   "MODEL.WEIGHTS", data["weights"][3]]
    rc = demo_tool.main(["--config-file", CONFIG, "--input", str(images), "--output", str(tmp_path / "v1"),
                         "--opts", *opts])
    assert rc == 2 and "was trained for 3 classes, the model predicts 5" in randwire_logs.text
    assert not os.path.exists(tmp_path / "v1" / "a.png")
    # a checkpoint that records its classes: boxes carry those names
    import detectron2.utils.visualizer as vis

    labels = []
    original = vis._create_text_labels
    monkeypatch.setattr(vis, "_create_text_labels", lambda *a, **k: labels.extend(original(*a, **k) or []) or
                        original(*a, **k))
    named = _save_with_classes(data, tmp_path, 3, ["tree", "bush", "rock"])
    rc = demo_tool.main(["--config-file", CONFIG, "--input", str(images), "--output", str(tmp_path / "v2"),
                         "--confidence-threshold", "0.0", "--opts", *_coco_opts(data, tmp_path / "o", weights=named)])
    assert rc == 0 and labels and all(label.split(" ")[0] in ("tree", "bush", "rock") for label in labels), labels
    assert "labelled with the checkpoint's" in randwire_logs.text


def test_eval_datasets_checked_before_training(data, tmp_path, randwire_logs):
    """A wrong val image_root is refused before any training, naming the config entry; a val
    json without annotations is said to give null metrics."""
    empty = tmp_path / "empty_images"
    os.makedirs(empty)
    def args(val_entry):
        opts = _coco_opts(data, tmp_path / "o") + ["DATASETS.COCO_JSON", repr([data["coco"][0], val_entry]),
                                                   "DATASETS.TEST", f"('{val_entry[0]}',)"]
        return default_argument_parser().parse_args(["--config-file", CONFIG, *opts])

    with pytest.raises(DataError, match=r"^cfg.DATASETS.COCO_JSON\[1\]: 6 of the 6 images of dataset "
                                        r"'mine_val_wrong_root' do not exist, e\.g\. '.*empty_images/val_.*' "
                                        r"\(wrong image_root\?\)\.$"):
        setup(args(["mine_val_wrong_root", data["coco"][1][1], str(empty)]))
    assert not os.path.exists(tmp_path / "o" / "metrics.json")
    bare = json.load(open(data["coco"][1][1]))
    bare["annotations"] = []
    with open(tmp_path / "bare.json", "w") as f:
        json.dump(bare, f)
    setup(args(["mine_val_bare", str(tmp_path / "bare.json"), data["coco"][1][2]]))
    assert "Dataset 'mine_val_bare' (DATASETS.COCO_JSON[1]) has no annotations: every evaluation metric will be " \
           "null" in randwire_logs.text


def test_boxes_outside_their_image_are_counted_and_all_unusable_refused(caplog):
    from randwire_d2.data.validation import sanitize_detection_dicts

    def record(i, *boxes):
        return {"file_name": f"{i}.jpg", "image_id": i, "width": 100, "height": 50,
                "annotations": [{"bbox": list(b), "bbox_mode": 1, "category_id": 0} for b in boxes]}

    inside, outside = (10, 10, 40, 40), (120, 10, 30, 30)  # XYWH_ABS (mode 1)
    dicts = [record(0, inside, outside), record(1, (10, 60, 20, 20))]  # y0 = 60 > height 50
    with caplog.at_level("WARNING"):
        kept, counts = sanitize_detection_dicts(dicts, 1, check_files=False, dataset_names=["d"])
    assert counts["dropped_boxes"] == 2 and counts["removed_images"] == 1
    assert [len(d["annotations"]) for d in kept] == [1]
    assert "entirely outside the 100x50 image" in caplog.text
    with pytest.raises(DataError, match=r"^No usable box left of dataset d: all 2 boxes are unusable .*outside "
                                        r"the 100x50 image.*Training would see background only"):
        sanitize_detection_dicts([record(0, outside), record(1, (10, 60, 20, 20))], 1, check_files=False,
                                 filter_empty=False, dataset_names=["d"])


def test_model_weights_that_are_not_a_checkpoint_are_named(tmp_path):
    from randwire_d2.engine import check_run_settings

    jpeg = tmp_path / "photo.pth"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    text = tmp_path / "notes.pkl"
    text.write_text("hello\n")
    for path, what in ((jpeg, "is a JPEG image"), (text, "is a text file")):
        cfg = setup_cfg(CONFIG, TINY + ["MODEL.WEIGHTS", str(path)])
        with pytest.raises(ValueError, match=rf"^cfg.MODEL.WEIGHTS = '{path}' {what}, not a checkpoint"):
            check_run_settings(cfg, world_size=1)


@pytest.mark.parametrize("opts,match", [
    (["MODEL.RANDWIRE.NODES", "5000"], r"cfg.MODEL.RANDWIRE.NODES = 5000 is invalid: an integer in \[2, 512\]"),
    (["MODEL.RANDWIRE.NORM", "GN", "MODEL.RANDWIRE.CHANNELS", "48"],
     r"cfg.MODEL.RANDWIRE.NORM = 'GN' \(32 groups\) needs every width divisible by 32, but "
     r"MODEL.RANDWIRE.CHANNELS = 48 .*use CHANNELS a multiple of 64"),
    (["MODEL.FPN.NORM", "GN", "MODEL.FPN.OUT_CHANNELS", "40"],
     r"cfg.MODEL.FPN.OUT_CHANNELS = 40 with MODEL.FPN.NORM 'GN' \(32 groups\): needs a multiple of 32"),
    (["MODEL.RANDWIRE.OUT_FEATURES", "['res3', 'res3', 'res4', 'res5']"],
     r"cfg.MODEL.RANDWIRE.OUT_FEATURES = \['res3', 'res3', 'res4', 'res5'\] is invalid: a list without duplicates"),
])
def test_model_settings_refused_before_launch_naming_the_key(data, tmp_path, opts, match):
    from randwire_d2.engine.preflight import check_before_launch

    cfg = setup_cfg(CONFIG, _coco_opts(data, tmp_path / "o") + opts)
    args = default_argument_parser().parse_args(["--config-file", CONFIG])
    with pytest.raises(ValueError, match=match):
        check_before_launch(cfg, args)


def test_nodes_above_the_paper_range_warn(data, tmp_path, randwire_logs):
    from randwire_d2.engine.preflight import check_before_launch

    cfg = setup_cfg(CONFIG, _coco_opts(data, tmp_path / "o") + ["MODEL.RANDWIRE.NODES", "80"])
    check_before_launch(cfg, default_argument_parser().parse_args(["--config-file", CONFIG]))
    assert "cfg.MODEL.RANDWIRE.NODES = 80 is far above the paper's N = 32" in randwire_logs.text


def test_copied_template_names_its_base(tmp_path):
    copy = tmp_path / "my_finetune.yaml"
    shutil.copy(CONFIG, copy)
    with pytest.raises(FileNotFoundError, match=rf"^'{copy}': _BASE_ '../randwire_frcnn.yaml' resolves to "
                                                rf"'{tmp_path.parent}/randwire_frcnn.yaml', which does not exist .*"
                                                rf"set it to '{REPO}/configs/randwire_frcnn.yaml'\.$"):
        setup_cfg(str(copy))


def test_template_copy_is_runnable_after_pointing_it_at_the_data(data, tmp_path):
    """The fine-tuning template, copied elsewhere: with its _BASE_ made absolute (what the
    error says) and the dataset entries pointed at the data, every pre-launch check passes
    and the class count comes from the training data."""
    from randwire_d2.engine.preflight import check_before_launch

    text = open(CONFIG).read().replace('"../randwire_frcnn.yaml"', repr(os.path.join(REPO, "configs/randwire_frcnn.yaml")))
    text = text.replace('"datasets/my_dataset/annotations/train.json", "datasets/my_dataset/images"',
                        f'"{data["coco"][0][1]}", "{data["coco"][0][2]}"')
    text = text.replace('"datasets/my_dataset/annotations/val.json", "datasets/my_dataset/images"',
                        f'"{data["coco"][1][1]}", "{data["coco"][1][2]}"')
    copy = tmp_path / "mine.yaml"
    copy.write_text(text)
    opts = ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "o")]  # this machine has no GPU
    args = default_argument_parser().parse_args(["--config-file", str(copy), *opts])
    cfg = setup_cfg(str(copy), opts)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3 and cfg.MODEL.WEIGHTS == ""
    check_before_launch(cfg, args)
    setup(args)  # what every training process runs before building the model
