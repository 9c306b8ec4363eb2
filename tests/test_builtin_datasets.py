"""A missing builtin dataset (COCO under $DETECTRON2_DATASETS) says where it is read from."""
import os

import pytest

from detectron2.data import MetadataCatalog
from randwire_d2.engine import Trainer, builtin_dataset_hint, lazyconfig_train_net

from conftest import REPO, tiny_detection_cfg


COCO_VAL = MetadataCatalog.get("coco_2017_val").json_file


@pytest.fixture
def no_coco(monkeypatch, tmp_path):
    if os.path.exists(COCO_VAL):
        pytest.skip(f"COCO is present at {COCO_VAL}")
    monkeypatch.chdir(tmp_path)  # detectron2 registered the builtin paths relative to the cwd


def test_eval_loader_names_detectron2_datasets(no_coco):
    with pytest.raises(FileNotFoundError) as info:
        Trainer.build_test_loader(tiny_detection_cfg(), "coco_2017_val")
    msg = str(info.value)
    assert "instances_val2017.json" in msg and "$DETECTRON2_DATASETS (" in msg and "export DETECTRON2_DATASETS=" in msg


def test_lazy_eval_loader_names_detectron2_datasets(no_coco):
    cfg = lazyconfig_train_net.load_config(os.path.join(REPO, "configs/lazy/randwire_frcnn.py"), ["train.device=cpu"])
    with pytest.raises(FileNotFoundError, match="dataloader.test: .*DETECTRON2_DATASETS"):
        lazyconfig_train_net.do_test(cfg, model=None)


def test_hint_only_for_files_under_the_builtin_root(tmp_path):
    assert builtin_dataset_hint(FileNotFoundError(2, "No such file", str(tmp_path / "mine.json"))) == ""
    assert builtin_dataset_hint(ValueError("not a file error")) == ""
