"""Tests for the embedded procedural demo dataset (randwire_d2.data.demo)."""
import json
import os
import sys
from collections import Counter

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from randwire_d2.data import demo  # noqa: E402

NUM_TRAIN, NUM_VAL = 24, 8


def _read_tree(root):
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                files[os.path.relpath(p, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo") / "ds")
    demo.generate_demo_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    return root


def test_layout(small_root):
    assert sorted(os.listdir(small_root)) == sorted(
        ["train", "val", "annotations", demo.MARKER_FILE]
    )
    assert len(os.listdir(os.path.join(small_root, "train"))) == NUM_TRAIN
    assert len(os.listdir(os.path.join(small_root, "val"))) == NUM_VAL
    assert demo.is_valid_demo_dataset(small_root, NUM_TRAIN, NUM_VAL, 0)
    # no temporary directories left next to it
    assert os.listdir(os.path.dirname(small_root)) == ["ds"]


def test_deterministic(small_root, tmp_path):
    other = demo.generate_demo_dataset(
        str(tmp_path / "again"), num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0
    )
    a, b = _read_tree(small_root), _read_tree(other)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    # another seed gives other data
    third = demo.generate_demo_dataset(str(tmp_path / "seed1"), num_train=4, num_val=2, seed=1)
    assert _read_tree(third)["train/000000.jpg"] != a["train/000000.jpg"]


def test_val_independent_of_num_train(small_root, tmp_path):
    other = demo.generate_demo_dataset(str(tmp_path / "x"), num_train=3, num_val=NUM_VAL, seed=0)
    with open(os.path.join(small_root, "annotations", "val.json")) as f:
        a = json.load(f)
    with open(os.path.join(other, "annotations", "val.json")) as f:
        b = json.load(f)
    assert a == b


@pytest.mark.parametrize("split,num", [("train", NUM_TRAIN), ("val", NUM_VAL)])
def test_annotations_valid(small_root, split, num):
    from PIL import Image

    with open(os.path.join(small_root, "annotations", f"{split}.json")) as f:
        coco = json.load(f)
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(cats) == list(range(1, len(demo.DEMO_CLASSES) + 1))
    assert [cats[i] for i in sorted(cats)] == demo.DEMO_CLASSES
    assert len(coco["images"]) == num
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == num

    sizes = set()
    for im in coco["images"]:
        with Image.open(os.path.join(small_root, split, im["file_name"])) as pil:
            assert pil.size == (im["width"], im["height"])
            assert pil.mode == "RGB"
        assert 160 <= im["width"] <= 320 and 160 <= im["height"] <= 320
        sizes.add((im["width"], im["height"]))
    assert len(sizes) > num // 2, "image sizes should vary"

    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0
        assert x + w <= im["width"] and y + h <= im["height"]
        assert a["category_id"] in cats
        assert a["iscrowd"] == 0
        assert 0 < a["area"] <= w * h

    per_image = Counter(a["image_id"] for a in coco["annotations"])
    assert max(per_image.values()) >= 3, "some images should have several objects"
    assert len(per_image) >= num * 0.8, "most images should have objects"
    classes = Counter(a["category_id"] for a in coco["annotations"])
    assert len(classes) >= 4, classes
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]]
    assert min(sides) < 30 and max(sides) > 60, "object sizes should vary"


def test_ensure_regenerates_partial_or_stale(tmp_path):
    root = str(tmp_path / "ds")
    # a half-written dataset: no marker
    os.makedirs(os.path.join(root, "train"))
    with open(os.path.join(root, "train", "000000.jpg"), "wb") as f:
        f.write(b"garbage")
    assert not demo.is_valid_demo_dataset(root, 4, 2)
    assert demo.ensure_demo_dataset(root, num_train=4, num_val=2) == os.path.abspath(root)
    assert demo.is_valid_demo_dataset(root, 4, 2)
    good = _read_tree(root)
    assert good["train/000000.jpg"] != b"garbage"

    # valid: left untouched
    mtime = os.path.getmtime(os.path.join(root, demo.MARKER_FILE))
    demo.ensure_demo_dataset(root, num_train=4, num_val=2)
    assert os.path.getmtime(os.path.join(root, demo.MARKER_FILE)) == mtime

    # a missing image makes it invalid -> regenerated identically
    os.remove(os.path.join(root, "val", "000001.jpg"))
    assert not demo.is_valid_demo_dataset(root, 4, 2)
    demo.ensure_demo_dataset(root, num_train=4, num_val=2)
    assert _read_tree(root) == good

    # corrupt json
    with open(os.path.join(root, "annotations", "train.json"), "w") as f:
        f.write("{not json")
    demo.ensure_demo_dataset(root, num_train=4, num_val=2)
    assert _read_tree(root) == good

    # marker from another generator version
    with open(os.path.join(root, demo.MARKER_FILE)) as f:
        marker = json.load(f)
    marker["generator_version"] = -1
    with open(os.path.join(root, demo.MARKER_FILE), "w") as f:
        json.dump(marker, f)
    assert not demo.is_valid_demo_dataset(root, 4, 2)
    demo.ensure_demo_dataset(root, num_train=4, num_val=2)
    assert _read_tree(root) == good
    assert sorted(os.listdir(str(tmp_path))) == ["ds"], "no temp dirs left behind"


def test_failed_generation_leaves_no_partial(tmp_path, monkeypatch):
    root = str(tmp_path / "ds")

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo, "_write_split", boom)
    with pytest.raises(RuntimeError):
        demo.generate_demo_dataset(root, num_train=2, num_val=1)
    assert os.listdir(str(tmp_path)) == []


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("RANDWIRE_DEMO_ROOT", str(tmp_path / "envroot"))
    assert demo.default_demo_root() == str(tmp_path / "envroot")
    monkeypatch.delenv("RANDWIRE_DEMO_ROOT")
    assert demo.default_demo_root().endswith(os.path.join(".cache", "randwire_d2", "demo_v1"))


def test_register_and_load(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = str(tmp_path / "reg")
    names = ("randwire_demo_test_train", "randwire_demo_test_val")
    try:
        kw = dict(root=root, names=names, num_train=6, num_val=5)
        assert demo.register_demo_datasets(**kw) == names
        assert demo.register_demo_datasets(**kw) == names  # idempotent
        assert not os.path.exists(root), "registration must be lazy"

        dicts = DatasetCatalog.get(names[1])  # generates on first use
        assert demo.is_valid_demo_dataset(root, 6, 5)
        assert len(dicts) == 5
        meta = MetadataCatalog.get(names[1])
        assert meta.thing_classes == demo.DEMO_CLASSES
        assert meta.evaluator_type == "coco"
        assert os.path.isfile(meta.json_file)
        assert meta.image_root == os.path.join(os.path.abspath(root), "val")
        assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(5)}
        n_anns = 0
        for d in dicts:
            assert os.path.isfile(d["file_name"])
            assert {"height", "width", "image_id", "annotations"} <= set(d)
            for a in d["annotations"]:
                assert 0 <= a["category_id"] < len(demo.DEMO_CLASSES)
                n_anns += 1
        assert n_anns > 0
        assert len(DatasetCatalog.get(names[0])) == 6
    finally:
        for n in names:
            if n in DatasetCatalog.list():
                DatasetCatalog.remove(n)
            if n in MetadataCatalog.list():
                MetadataCatalog.remove(n)


def test_default_names_registered_lazily():
    """The package's default registration (done on import) must not generate."""
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog

    demo.register_demo_datasets()
    demo.register_demo_datasets()
    for n in demo.DEMO_DATASET_NAMES:
        assert n in DatasetCatalog.list()


def test_demo_tool_collect_inputs(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "demo.py")
    spec = importlib.util.spec_from_file_location("randwire_tools_demo", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    d = tmp_path / "imgs"
    d.mkdir()
    for n in ("b.jpg", "a.PNG", "notes.txt"):
        (d / n).write_bytes(b"x")
    single = tmp_path / "c.jpg"
    single.write_bytes(b"x")
    got = tool.collect_inputs([str(d), str(single), str(d / "*.jpg")])
    assert got == [str(d / "a.PNG"), str(d / "b.jpg"), str(single)]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        tool.collect_inputs([str(tmp_path / "missing.jpg")])
    with pytest.raises(FileNotFoundError, match="nothing"):
        tool.collect_inputs([str(tmp_path / "*.bmp")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        tool.collect_inputs([str(tmp_path / "empty")])
    args = tool.get_parser().parse_args(
        ["--config-file", "c.yaml", "--input", "x.jpg", "--output", "o",
         "--opts", "MODEL.WEIGHTS", "w.pth", "MODEL.DEVICE", "cpu"]
    )
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "MODEL.DEVICE", "cpu"]
    assert args.confidence_threshold == 0.5
