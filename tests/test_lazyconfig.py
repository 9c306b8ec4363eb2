"""LazyConfig path: configs/lazy/* build the same models as their yaml twins, and
tools/lazyconfig_train_net.py trains the demo exactly as tools/train_net.py does (same
weights after training), with graph specs in every checkpoint and exact resume."""
import json
import os
import shutil

import pytest
import torch
from omegaconf import DictConfig, ListConfig

from detectron2.config import instantiate
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from randwire_d2.checkpoint import GRAPHS_KEY, graph_specs_of
from randwire_d2.data.demo import register_demo_datasets
from randwire_d2.engine import RESULTS_FILE, lazyconfig_train_net, setup_cfg, train_net
from randwire_d2.graphs import specs_from_dict

from conftest import REPO


TWINS = [  # yaml, LazyConfig
    ("configs/demo/randwire_frcnn_demo.yaml", "configs/lazy/demo/randwire_frcnn_demo.py"),
    ("configs/randwire_frcnn.yaml", "configs/lazy/randwire_frcnn.py"),
    ("configs/randwire_frcnn_small_c78.yaml", "configs/lazy/randwire_frcnn_small_c78.py"),
    ("configs/imagenet/randwire_ws_regular_c109.yaml", "configs/lazy/imagenet/randwire_ws_regular_c109.py"),
]


def _plain(v):
    """Config containers as plain lists/dicts, numbers as floats: -1 == -1.0, (1, 2) == [1, 2]."""
    if isinstance(v, (list, tuple, ListConfig)):
        return [_plain(x) for x in v]
    if isinstance(v, (dict, DictConfig)):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if hasattr(v, "__dict__") and not isinstance(v, type) and not callable(v):  # Matcher, Box2BoxTransform, ...
        return {"<" + type(v).__name__ + ">": _plain(vars(v))}
    return v if isinstance(v, (str, bool, type(None))) else repr(type(v))


def settings(model):
    """Every module's public non-tensor attributes (thresholds, top-k, sampling sizes,
    feature names, matchers, box transforms, ...) and its buffers (anchors)."""
    out = {}
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if not k.startswith("_") and not isinstance(v, (torch.nn.Module, torch.Tensor)):
                out[f"{name}:{k}"] = _plain(v)
        for b, t in m.named_buffers(recurse=False):
            out[f"{name}:buffer:{b}"] = t.tolist()
    if "roi_heads.box_predictor:loss_weight" in out:  # a missing key means weight 1.0
        out["roi_heads.box_predictor:loss_weight"].setdefault("loss_cls", 1.0)
    return out


@pytest.mark.parametrize("yaml_file,lazy_file", TWINS, ids=[t[1].split("/")[-1] for t in TWINS])
def test_lazy_config_builds_the_yaml_model(yaml_file, lazy_file):
    """Same parameters (names, shapes and, from one seed, values), same graphs, same settings."""
    cfg = setup_cfg(os.path.join(REPO, yaml_file), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    lazy = lazyconfig_train_net.load_config(os.path.join(REPO, lazy_file), ["train.device=cpu"])
    seed_all_rng(0)
    a = build_model(cfg)
    seed_all_rng(0)
    b = instantiate(lazy.model)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k
    assert graph_specs_of(a) == graph_specs_of(b) and len(graph_specs_of(a)) >= 3
    assert [n for n, p in a.named_parameters() if p.requires_grad] == [
        n for n, p in b.named_parameters() if p.requires_grad
    ]
    fa, fb = settings(a), settings(b)
    assert fa.keys() == fb.keys()
    assert {k: fa[k] for k in fa if fa[k] != fb[k]} == {}, {k: fb[k] for k in fa if fa[k] != fb[k]}


# --------------------------------------------------------------------------- training
TRAIN, VAL = "lazy_demo_train", "lazy_demo_val"
MAX_ITER = 4


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return register_demo_datasets(
        root=str(tmp_path_factory.mktemp("lazy_demo")), names=(TRAIN, VAL), num_train=8, num_val=2
    )


def _yaml_demo(out):
    """The yaml demo, shrunk: 4 iterations of 2 images, LR steps at 2 and 3."""
    opts = [
        "MODEL.RANDWIRE.CHANNELS", "16", "MODEL.RANDWIRE.NODES", "6", "MODEL.RANDWIRE.DROP_PATH", "0.1",
        "DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", f"('{VAL}',)",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.STEPS", "(2, 3)",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(96, 128)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "128",
        "OUTPUT_DIR", str(out),
    ]
    return ["--config-file", os.path.join(REPO, "configs/demo/randwire_frcnn_demo.yaml"), *opts]


def _lazy_demo(out, *flags):
    """The same shrinking, as LazyConfig overrides."""
    opts = [
        "model.backbone.bottom_up.channels=16", "model.backbone.bottom_up.graphs.num_nodes=6",
        "model.backbone.bottom_up.drop_path=0.1",
        f"dataloader.train.dataset_dicts.names={TRAIN}", f"dataloader.test.dataset.names={VAL}",
        "dataloader.train.total_batch_size=2", f"train.max_iter={MAX_ITER}",
        "lr_multiplier.scheduler.milestones=[2,3]", f"lr_multiplier.scheduler.num_updates={MAX_ITER}",
        f"lr_multiplier.warmup_length={1 / MAX_ITER}", "train.checkpointer.period=2",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[96,128]",
        "dataloader.train.mapper.augmentations.0.max_size=160",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        f"train.output_dir={out}",
    ]
    return ["--config-file", os.path.join(REPO, "configs/lazy/demo/randwire_frcnn_demo.py"), *flags, *opts]


def _run(tool, argv):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tool.main(default_argument_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def lazy_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lazy_out") / "run"
    _run(lazyconfig_train_net, _lazy_demo(out))
    return out


def test_lazy_demo_trains_like_the_yaml_demo(lazy_run, tmp_path):
    """Same model, data stream, optimizer groups, LR and RNG streams: identical weights
    after training and identical COCO metrics."""
    _run(train_net, _yaml_demo(tmp_path / "yaml"))
    a, b = _ckpt(tmp_path / "yaml" / "model_final.pth"), _ckpt(lazy_run / "model_final.pth")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["iteration"] == b["iteration"] == MAX_ITER - 1
    with open(tmp_path / "yaml" / RESULTS_FILE) as f1, open(lazy_run / RESULTS_FILE) as f2:
        ra, rb = json.load(f1), json.load(f2)
    assert ra == rb and set(ra["bbox"]) >= {"AP", "AP50", "AP75"}


def test_lazy_checkpoints_carry_graph_specs(lazy_run):
    saved = sorted(f for f in os.listdir(lazy_run) if f.endswith(".pth"))
    assert saved == ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]
    assert not [f for f in os.listdir(lazy_run) if ".tmp" in f]  # atomic writes
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(str(lazy_run / "config.yaml"))  # default_setup saved the run's config
    model_specs = graph_specs_of(instantiate(cfg.model))
    for name in saved:
        ckpt = _ckpt(lazy_run / name)
        assert specs_from_dict(ckpt[GRAPHS_KEY]) == model_specs
        assert "optimizer" in ckpt["trainer"] and "ExactResumeHook" in ckpt["trainer"]["hooks"]


def test_lazy_resume_is_exact(lazy_run, tmp_path, monkeypatch):
    """Resuming from the iteration-1 checkpoint ends with the uninterrupted run's weights."""
    run = tmp_path / "resumed"
    shutil.copytree(lazy_run, run)
    for name in ("model_0000003.pth", "model_final.pth", RESULTS_FILE):
        os.remove(run / name)
    (run / "last_checkpoint").write_text("model_0000001.pth")
    trainers = []
    do_train = lazyconfig_train_net.do_train
    monkeypatch.setattr(lazyconfig_train_net, "do_train", lambda *a: trainers.append(do_train(*a)))
    _run(lazyconfig_train_net, _lazy_demo(run, "--resume"))
    trainer = trainers[0]
    assert trainer.start_iter == 2 and trainer.data_loader.start_iter == 2  # resumed, not restarted
    a, b = _ckpt(lazy_run / "model_final.pth")["model"], _ckpt(run / "model_final.pth")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lazy_tool_refuses_yaml_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="tools/train_net.py"):
        lazyconfig_train_net.load_config(os.path.join(REPO, "configs/demo/randwire_frcnn_demo.yaml"))
    cfg = lazyconfig_train_net.load_config(
        os.path.join(REPO, "configs/lazy/randwire_frcnn.py"), ["train.device=cpu", f"train.output_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match="train.init_checkpoint = 'pretrained/randwire_ws_regular_c109.pkl'"):
        lazyconfig_train_net.check_train_settings(cfg)
    cfg.train.init_checkpoint = ""  # from scratch with the pretrained config's FrozenBN
    with pytest.raises(ValueError, match=r"model.backbone.bottom_up.norm = 'FrozenBN' with no train.init_checkpoint"):
        lazyconfig_train_net.check_train_settings(cfg)
    cfg.model.backbone.bottom_up.norm = "BN"
    lazyconfig_train_net.check_train_settings(cfg)


def test_lazy_override_of_a_missing_key_is_refused():
    demo = os.path.join(REPO, "configs/lazy/demo/randwire_frcnn_demo.py")
    with pytest.raises(KeyError, match=r"Non-existent config key: train.max_iterr .*'max_iter'"):
        lazyconfig_train_net.load_config(demo, ["train.max_iterr=5"])
    with pytest.raises(KeyError, match="model.roi_heads.box_predictor.test_nms"):
        lazyconfig_train_net.load_config(demo, ["model.roi_heads.box_predictor.test_nms=0.3"])
    # an optional constructor argument the config leaves at its default may be set
    cfg = lazyconfig_train_net.load_config(demo, ["model.proposal_generator.min_box_size=2", "train.max_iter=7"])
    assert cfg.model.proposal_generator.min_box_size == 2 and cfg.train.max_iter == 7
