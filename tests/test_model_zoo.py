"""randwire_d2.model_zoo: configs by name (yaml and LazyConfig), built models, the error for
trained weights that are not published, and the configs shipped inside an installed package."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from detectron2.config import CfgNode

from randwire_d2 import model_zoo
from randwire_d2.checkpoint import RandWireCheckpointer
from randwire_d2.modeling.network import RandWireNet

from conftest import REPO


def test_config_file_by_name_is_the_checkout_file():
    path = model_zoo.get_config_file("randwire_frcnn.yaml")
    assert os.path.samefile(path, os.path.join(REPO, "configs", "randwire_frcnn.yaml"))
    names = model_zoo.list_configs()
    assert {"randwire_frcnn.yaml", "demo/randwire_frcnn_demo.yaml", "lazy/randwire_frcnn.py",
            "baselines/faster_rcnn_R_50_FPN_demo.yaml", "imagenet/randwire_ws_small_c78.yaml"} <= set(names)
    assert not any(n.endswith("__init__.py") for n in names)


@pytest.mark.parametrize("name", ["nope.yaml", "../setup.py", "configs/randwire_frcnn.yaml", "lazy/common"])
def test_unknown_config_names_are_refused_listing_the_zoo(name):
    with pytest.raises(FileNotFoundError, match=r"not in the randwire_d2 model zoo.*randwire_frcnn\.yaml"):
        model_zoo.get_config_file(name)


def test_yaml_config_has_randwire_keys_and_its_base():
    cfg = model_zoo.get_config("randwire_frcnn_small_c78.yaml")
    assert isinstance(cfg, CfgNode)
    assert (cfg.MODEL.RANDWIRE.REGIME, cfg.MODEL.RANDWIRE.CHANNELS) == ("small", 78)
    assert cfg.MODEL.BACKBONE.NAME == "build_randwire_fpn_backbone"  # from _BASE_
    assert cfg.SOLVER.MAX_ITER == 90000 and cfg.MODEL.WEIGHTS == "pretrained/randwire_ws_small_c78.pkl"
    assert "EPOCHS" in cfg.SOLVER  # classification keys too: imagenet configs load
    assert model_zoo.get_config("imagenet/randwire_ws_small_c78.yaml").MODEL.META_ARCHITECTURE == "RandWireClassifier"


def test_lazy_config_loads_with_relative_imports():
    cfg = model_zoo.get_config("lazy/randwire_frcnn_small_c78.py")
    assert cfg.model.backbone.bottom_up.channels == 78 and cfg.train.max_iter == 90000


@pytest.mark.parametrize("name", ["randwire_frcnn.yaml", "lazy/randwire_frcnn.py"])
def test_trained_weights_not_published_is_a_clear_error(name):
    with pytest.raises(RuntimeError, match=rf"No published trained weights for '{name}'.*none yet"):
        model_zoo.get_config(name, trained=True)
    with pytest.raises(RuntimeError, match="No published trained weights"):
        model_zoo.get(name, trained=True)


def test_get_refuses_missing_config_weights_naming_them():
    with pytest.raises(FileNotFoundError, match=r"randwire_frcnn\.yaml: weights 'pretrained/randwire_ws_regular_c109\.pkl'"):
        model_zoo.get("randwire_frcnn.yaml", device="cpu")


def test_get_builds_the_demo_and_loads_given_weights(tmp_path):
    model = model_zoo.get("demo/randwire_frcnn_demo.yaml", device="cpu")  # MODEL.WEIGHTS "": from scratch
    net = next(m for m in model.modules() if isinstance(m, RandWireNet))
    assert net.channels == 32 and len(net.graph_specs) == 3 and model.roi_heads.num_classes == 5
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    RandWireCheckpointer(model, save_dir=str(tmp_path)).save("mine")
    loaded = model_zoo.get("demo/randwire_frcnn_demo.yaml", device="cpu", weights=str(tmp_path / "mine.pth"))
    fresh = model_zoo.get("demo/randwire_frcnn_demo.yaml", device="cpu", weights="")
    got, init = dict(loaded.named_parameters()), dict(fresh.named_parameters())
    for name, want in model.named_parameters():  # every parameter: the checkpoint's, not a fresh init
        assert torch.equal(got[name], want) and not torch.equal(init[name], want), name

    lazy = model_zoo.get("lazy/demo/randwire_frcnn_demo.py", device="cpu")  # the yaml's LazyConfig twin
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in lazy.state_dict().items()} == shapes


def test_installed_package_finds_its_configs_from_another_directory(tmp_path):
    """A non-editable install (into a target folder) used from elsewhere: the configs are package
    data; _BASE_ paths and LazyConfig relative imports resolve inside the installed copy."""
    src, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "configs")
    shutil.copytree(os.path.join(REPO, "randwire_d2"), src / "randwire_d2", ignore=ignore)
    shutil.copytree(os.path.join(REPO, "configs"), src / "configs", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("setup.py", "MANIFEST.in"):
        shutil.copy(os.path.join(REPO, f), src / f)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    shutil.rmtree(src)  # nothing may point back at the sources
    elsewhere.mkdir()
    check = textwrap.dedent(f"""
        import os, randwire_d2
        from randwire_d2 import model_zoo
        assert randwire_d2.__file__.startswith({str(target)!r}), randwire_d2.__file__
        assert model_zoo.get_config_file("randwire_frcnn.yaml").startswith({str(target)!r})
        assert model_zoo.get_config("randwire_frcnn.yaml").MODEL.BACKBONE.NAME == "build_randwire_fpn_backbone"
        assert model_zoo.get_config("custom/randwire_frcnn_finetune.yaml").MODEL.RANDWIRE.CHANNELS == 109
        assert model_zoo.get_config("baselines/faster_rcnn_R_50_FPN_demo.yaml").SOLVER.MAX_ITER == 1400
        assert model_zoo.get_config("lazy/demo/randwire_frcnn_demo.py").train.max_iter == 1400
        print(len(model_zoo.list_configs()))
    """)
    env = dict(os.environ, PYTHONPATH=str(target))
    run = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) == len(model_zoo.list_configs())
