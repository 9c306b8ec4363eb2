"""Fuzzing: random combinations of config and graph parameters either build a working
network or raise *our* ValueError (raised inside randwire_d2, naming what is wrong),
never any other exception. A seeded loop of 1000 cases; a forward pass on every 5th
successfully built network. Select with ``-k fuzz``.
"""
import json
import math
import os
import random
import traceback

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model

from conftest import REPO
from randwire_d2.engine import setup_cfg

PKG = os.path.join(REPO, "randwire_d2") + os.sep
NUM_CASES = 1000
FORWARD_EVERY = 5
STAGES = ["stem", "res2", "res3", "res4", "res5"]


def _pick(rng, good, bad, p_bad=0.06):
    return rng.choice(bad) if rng.random() < p_bad else (good() if callable(good) else rng.choice(good))


def _random_case(rng, tmp_path, i):
    n = _pick(rng, lambda: rng.randint(2, 12), [0, 1, -3, 2.5, "8", None, True])
    case = {
        "REGIME": _pick(rng, ["small", "regular"], ["large", "", None, 3]),
        "CHANNELS": _pick(rng, lambda: rng.randint(2, 20), [0, 1, -8, 7.5, "16", None, False]),
        "NODES": n,
        "GENERATOR": _pick(rng, ["WS", "ER", "BA", "ws", "er"], ["XX", "", None, 1]),
        "WS_K": _pick(rng, lambda: rng.choice([2, 4, 6]) if rng.random() < 0.8 else rng.randint(-2, 14),
                      [3.0, "4", None, float("nan")]),
        "WS_P": _pick(rng, lambda: rng.random(), [-0.1, 1.5, float("nan"), float("inf"), "0.5", None]),
        "ER_P": _pick(rng, lambda: rng.uniform(0.05, 1.0), [-0.5, 2.0, float("nan"), None]),
        "BA_M": _pick(rng, lambda: rng.randint(1, 6), [0, -1, 1.5, 100, None]),
        "SEED": _pick(rng, lambda: rng.randint(0, 10**6), [-1, 1.5, "3", None]),
        "NORM": _pick(rng, ["BN", "FrozenBN", "naiveSyncBN", "SyncBN", "GN"], ["LN", "", "bn", None]),
        "DROP_PATH": _pick(rng, lambda: rng.choice([0.0, rng.uniform(0, 0.9)]), [-0.1, 1.0, 3, float("nan"), "0.1"]),
        "OUT_FEATURES": _pick(
            rng, lambda: sorted(rng.sample(STAGES, rng.randint(1, 5)), key=STAGES.index),
            [[], ["res6"], ["linear"], "res4", None, ["res4", "res4"]],
        ),
        "EXECUTOR": _pick(rng, ["lean", "reference"], ["fast", "", None, "batched"], p_bad=0.05),
    }
    if rng.random() < 0.06:  # a graph-spec file: valid, edited, or broken
        case["GRAPHS_FILE"] = _random_graphs_file(rng, tmp_path, i, case)
    builder = rng.choice(["backbone", "backbone", "backbone", "fpn", "classifier"])
    return case, builder


def _random_graphs_file(rng, tmp_path, i, case):
    path = tmp_path / f"graphs_{i}.json"
    kind = rng.choice(["missing", "garbage", "edges", "ok"])
    if kind == "missing":
        return str(path)
    if kind == "garbage":
        path.write_text(rng.choice(["{", "[]", '{"res3": 5}', '{"res3": {"num_nodes": 3}}']))
        return str(path)
    specs = {}
    for stage in ("res2", "res3", "res4", "res5"):
        nodes = rng.randint(1, 6)
        edges = [[u, v] for u in range(nodes) for v in range(u + 1, nodes) if rng.random() < 0.5]
        if kind == "edges" and rng.random() < 0.5:
            edges.append(rng.choice([[3, 1], [0, 0], [0, 99], ["a", 1], [1]]))
        specs[stage] = {"num_nodes": nodes, "edges": edges}
    path.write_text(json.dumps(specs))
    return str(path)


def _cfg(case, builder):
    config = "configs/fashion_mnist/randwire_tiny.yaml" if builder == "classifier" else "configs/randwire_frcnn.yaml"
    cfg = setup_cfg(os.path.join(REPO, config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    cfg.MODEL.BACKBONE.NAME = "build_randwire_fpn_backbone" if builder == "fpn" else "build_randwire_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 8
    cfg.MODEL.RANDWIRE.HEAD_CHANNELS = 8
    for key, value in case.items():  # straight into the node: any type, as a hand-edited cfg could be
        cfg.MODEL.RANDWIRE[key] = value
    if builder == "fpn" and isinstance(case["OUT_FEATURES"], list):
        feats = [f for f in case["OUT_FEATURES"] if f.startswith("res")]
        cfg.MODEL.FPN.IN_FEATURES = feats or ["res5"]
    return cfg


def _build(cfg, builder):
    if builder == "classifier":
        return build_model(cfg)
    return build_backbone(cfg, ShapeSpec(channels=3))


def _fpn_inputs(case):
    feats = case["OUT_FEATURES"]
    return [f for f in feats if f.startswith("res")] if isinstance(feats, list) else []


def _raised_by_us(exc) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(PKG)


def test_fuzz_config_and_graph_parameters(tmp_path):
    rng = random.Random(20261124)
    torch.manual_seed(0)
    outcomes = {"built": 0, "refused": 0, "forward": 0}
    for i in range(NUM_CASES):
        case, builder = _random_case(rng, tmp_path, i)
        where = f"case {i} ({builder}): {case}"
        try:
            cfg = _cfg(case, builder)
            model = _build(cfg, builder)
        except ValueError as exc:
            assert _raised_by_us(exc), f"{where}\nValueError not raised by randwire_d2:\n{traceback.format_exc()}"
            assert str(exc), where
            outcomes["refused"] += 1
            continue
        except Exception:
            pytest.fail(f"{where}\nunexpected exception:\n{traceback.format_exc()}")
        outcomes["built"] += 1
        if outcomes["built"] % FORWARD_EVERY:
            continue
        model.eval()
        with torch.no_grad():
            try:
                if builder == "classifier":
                    images = [{"image": torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)} for _ in range(2)]
                    out = model(images)
                    assert len(out) == 2, where
                    for r in out:
                        assert r["scores"].shape == (cfg.MODEL.RANDWIRE.NUM_CLASSES,), where
                        assert torch.isfinite(r["scores"]).all(), where
                else:
                    feats = model(torch.randn(2, 3, 64, 64))
                    shapes = model.output_shape()
                    assert set(feats) == set(shapes), where
                    for name, t in feats.items():
                        assert t.shape[1] == shapes[name].channels, (where, name)
                        assert t.shape[-1] == math.ceil(64 / shapes[name].stride), (where, name)
                        assert torch.isfinite(t).all(), (where, name)
            except AssertionError:
                raise
            except Exception:
                pytest.fail(f"{where}\nforward failed:\n{traceback.format_exc()}")
        outcomes["forward"] += 1
    print(f"fuzz outcomes over {NUM_CASES} cases: {outcomes}")
    # the generator explores both sides
    assert outcomes["built"] >= NUM_CASES // 5 and outcomes["refused"] >= NUM_CASES // 5, outcomes
    assert outcomes["forward"] >= NUM_CASES // 25, outcomes


# Inputs the fuzzer once found escaping as foreign exceptions (TypeError from list(None),
# JSONDecodeError, detectron2's FPN stride assertion): now each must be our ValueError.
FOUND_CASES = {
    "OUT_FEATURES not a list": ("backbone", {"OUT_FEATURES": None}),
    "GRAPHS_FILE not a JSON object of specs": ("backbone", {"GRAPHS_FILE": "["}),
    "FPN inputs with gaps or without res5": ("fpn", {"OUT_FEATURES": ["res2", "res4", "res5"]}),
}


@pytest.mark.parametrize("name", sorted(FOUND_CASES))
def test_fuzz_found_cases_raise_our_error(name, tmp_path):
    builder, override = FOUND_CASES[name]
    case = {"REGIME": "small", "CHANNELS": 8, "NODES": 6, "GENERATOR": "WS", "WS_K": 4, "WS_P": 0.5,
            "SEED": 0, "NORM": "BN", "OUT_FEATURES": ["res3", "res4", "res5"], **override}
    if "GRAPHS_FILE" in case:
        (tmp_path / "g.json").write_text(case["GRAPHS_FILE"])
        case["GRAPHS_FILE"] = str(tmp_path / "g.json")
    with pytest.raises(ValueError) as err:
        _build(_cfg(case, builder), builder)
    assert _raised_by_us(err.value)


# --------------------------------------------------------------------------- run settings
INF = float("inf")
NAN = float("nan")
# key: (good values, bad values); a case changes a few keys, a bad one with probability ~8%
RUN_SETTINGS = {
    "SOLVER.IMS_PER_BATCH": ([2, 4], [0, -4, 3, 2.5, "4", None]),
    "SOLVER.BASE_LR": ([0.01, 0.1, 1e-4], [0, -0.1, NAN, INF, "0.1", None]),
    "SOLVER.MAX_ITER": ([1, 2, 3], [0, -1, 2.5, None]),
    "SOLVER.STEPS": ([(), (1,), (1, 2), (100,)], [(2, 1), (0,), (1.5,), "1", None, [-1]]),
    "SOLVER.GAMMA": ([0.1, 0.5], [0, -1, NAN]),
    "SOLVER.LR_SCHEDULER_NAME": (["WarmupMultiStepLR", "WarmupCosineLR"], ["Cosine", "", None]),
    "SOLVER.WARMUP_ITERS": ([0, 1, 5], [-1, 1.5, None]),
    "SOLVER.WARMUP_FACTOR": ([0.001, 1.0], [-0.1, 2.0, NAN]),
    "SOLVER.WARMUP_METHOD": (["linear", "constant"], ["exp", None]),
    "SOLVER.CHECKPOINT_PERIOD": ([1, 2, 100], [0, -1, None]),
    "SOLVER.MOMENTUM": ([0.0, 0.9], [-0.1, 1.0, 1.5]),
    "SOLVER.NESTEROV": ([True, False], ["yes", None]),
    "SOLVER.WEIGHT_DECAY": ([0.0, 1e-4], [-1.0, NAN]),
    "SOLVER.WEIGHT_DECAY_NORM": ([0.0, 1e-4], [-1.0, INF]),
    "SOLVER.BIAS_LR_FACTOR": ([1.0, 2.0], [-1.0, None]),
    "SOLVER.OPTIMIZER": (["SGD", "AdamW"], ["Adam", "sgd", None]),
    "SOLVER.BETAS": ([(0.9, 0.999), (0.5, 0.9)], [(0.9,), (1.0, 0.9), None, (0.9, -0.1)]),
    "SOLVER.CLIP_GRADIENTS.ENABLED": ([True, False], ["no"]),
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": (["value", "norm"], ["max", None]),
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": ([1.0, 0.5], [0.0, -1.0]),
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE": ([2.0, INF, 1], [0, -2.0, None]),
    "SOLVER.AMP.ENABLED": ([True, False], ["1"]),
    "SOLVER.REFERENCE_WORLD_SIZE": ([0, 1, 2], [-1, 3]),
    "SOLVER.EPOCHS": ([0.0, 0.5, 1.0], [-1.0, NAN, "1"]),
    "SOLVER.WARMUP_EPOCHS": ([0.0, 0.25], [-1.0]),
    "SOLVER.LR_PER_256": ([0.0, 0.1], [-0.1, INF]),
    "SOLVER.CHECKPOINT_EPOCHS": ([0.0, 0.5], [-1.0]),
    "DATALOADER.NUM_WORKERS": ([0, 0, 1], [-1, 1.5, None]),
    "DATALOADER.ASPECT_RATIO_GROUPING": ([True, False], ["no"]),
    "DATALOADER.SAMPLER_TRAIN": (["TrainingSampler", "RepeatFactorTrainingSampler"], ["Random", ""]),
    "DATALOADER.REPEAT_THRESHOLD": ([0.1, 0.5], [0.0, -1.0]),
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": ([True, False], [1]),
    "DATALOADER.CLS_PREFETCH_FACTOR": ([1, 2], [0, -1]),
    "TEST.EVAL_PERIOD": ([0, 1, 2], [-1, 1.5]),
    "TEST.IMS_PER_BATCH": ([1, 4], [0, -2]),
    "TEST.DETECTIONS_PER_IMAGE": ([10, 100], [0]),
    "TEST.EVAL_EPOCHS": ([0.0, 0.5], [-1.0]),
    "INPUT.FORMAT": (["BGR", "RGB"], ["L", "rgb", None]),
    "INPUT.RANDOM_FLIP": (["horizontal", "vertical", "none"], ["both", None]),
    "INPUT.MIN_SIZE_TRAIN": ([(32,), (32, 48)], [(), (0,), (-5,), 32, None]),
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": (["choice", "range"], ["uniform"]),
    "INPUT.MAX_SIZE_TRAIN": ([64, 80], [0]),
    "INPUT.MIN_SIZE_TEST": ([0, 48], [-1]),
    "INPUT.MAX_SIZE_TEST": ([64], [0]),
    "INPUT.CROP.ENABLED": ([True, False], ["yes"]),
    "INPUT.CROP.TYPE": (["relative_range", "relative", "absolute", "absolute_range"], ["center"]),
    "INPUT.CROP.SIZE": ([(0.5, 0.9), (0.9, 0.9), (16, 32), (24, 24)], [(0, 0.5), (0.5,), None]),
    "INPUT.CROP_SIZE": ([8, 16], [0, -1]),
    "INPUT.RESIZE_SIZE": ([16, 20], [4]),
    "INPUT.CLS_TRAIN_AUG": (["random_resized_crop", "pad_crop"], ["flip"]),
    "INPUT.CLS_CROP_SCALE": ([(0.08, 1.0), (0.5, 0.5)], [(0, 1), (0.9, 0.5), (0.5,)]),
    "INPUT.CLS_PAD": ([0, 2], [-1]),
    "MODEL.PIXEL_STD": ([[58.4, 57.1, 57.4], [1.0, 1.0, 1.0]], [[1.0, 0.0, 1.0], [1.0], None]),
}
NUM_RUN_CASES = 400
TRAIN_EVERY = 40  # a real two-iteration classification training every 40th accepted case


@pytest.fixture(scope="module")
def fuzz_folders(tmp_path_factory):
    import numpy as np
    from PIL import Image

    from randwire_d2.data.classification import register_image_folder

    root = tmp_path_factory.mktemp("fuzz_cls")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                px = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(px).save(root / split / cls / f"{i}.png")
    register_image_folder("fuzz_cls_train", str(root / "train"))
    register_image_folder("fuzz_cls_val", str(root / "val"))
    return root


def _run_cfg(task, tmp_path):
    if task == "classification":
        cfg = setup_cfg(os.path.join(REPO, "configs/fashion_mnist/randwire_tiny.yaml"), [
            "MODEL.RANDWIRE.CHANNELS", 4, "MODEL.RANDWIRE.NODES", 6, "MODEL.RANDWIRE.HEAD_CHANNELS", 8,
            "MODEL.RANDWIRE.NUM_CLASSES", 2, "DATASETS.TRAIN", ("fuzz_cls_train",), "DATASETS.TEST", ("fuzz_cls_val",),
            "INPUT.CROP_SIZE", 16, "INPUT.RESIZE_SIZE", 16, "SOLVER.IMS_PER_BATCH", 4, "SOLVER.MAX_ITER", 2,
            "TEST.IMS_PER_BATCH", 4, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path),
        ])
    else:
        cfg = setup_cfg(os.path.join(REPO, "configs/randwire_frcnn.yaml"), [
            "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RANDWIRE.NORM", "BN", "SOLVER.AMP.ENABLED", False,
            "INPUT.MIN_SIZE_TRAIN", (48,), "INPUT.MAX_SIZE_TRAIN", 64, "SOLVER.IMS_PER_BATCH", 2,
        ])
    return cfg


def _set(cfg, key, value):
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value  # straight into the node: any type, as a hand-edited cfg could be


def _tiny_module():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


def _exercise(cfg, task, image_path):
    """What a run does with these settings, short of training: optimizer steps under the
    LR schedule (with gradient clipping), and a mapped training image."""
    from detectron2.engine import DefaultTrainer

    from randwire_d2.engine import Trainer, derive_settings

    cfg = cfg.clone()
    derive_settings(cfg)
    model = _tiny_module()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    optimizer = Trainer.build_optimizer(cfg, model)
    scheduler = DefaultTrainer.build_lr_scheduler(cfg, optimizer)
    for _ in range(min(3, cfg.SOLVER.MAX_ITER)):  # a scheduler is stepped once per iteration
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    assert all(math.isfinite(g["lr"]) for g in optimizer.param_groups)
    if task == "classification":
        from randwire_d2.data.classification import ClassificationDatasetMapper

        out = ClassificationDatasetMapper(cfg, True)({"file_name": image_path, "label": 1, "image_id": 0})
        assert out["image"].shape == (3, cfg.INPUT.CROP_SIZE, cfg.INPUT.CROP_SIZE)
    else:
        from randwire_d2.data.validation import SafeDatasetMapper

        rec = {"file_name": image_path, "image_id": 0, "height": 20, "width": 24,
               "annotations": [{"bbox": [2, 2, 10, 10], "bbox_mode": 0, "category_id": 0, "iscrowd": 0}]}
        out = SafeDatasetMapper(cfg, True)(rec)
        assert out["image"].shape[0] == 3


def _train_two_iterations(cfg):
    """A real run of these settings (one process), shortened to at most two iterations."""
    from randwire_d2.engine import Trainer, derive_settings

    cfg = cfg.clone()
    derive_settings(cfg)
    cfg.SOLVER.MAX_ITER = min(cfg.SOLVER.MAX_ITER, 2)
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER


def test_fuzz_run_settings(tmp_path, fuzz_folders):
    """Random SOLVER/DATALOADER/TEST/INPUT settings: each is refused by the launcher's
    checks with our one-line error naming the key, or it runs (optimizer + schedule +
    mapper, and every 40th a real two-iteration training) without any exception."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and CI shares its cores)
    try:
        _fuzz_run_settings(tmp_path, fuzz_folders)
    finally:
        torch.set_num_threads(threads)


def _fuzz_run_settings(tmp_path, fuzz_folders):
    from randwire_d2.engine import check_run_settings
    from randwire_d2.engine.errors import one_line

    rng = random.Random(20261201)
    image = str(fuzz_folders / "train" / "a" / "0.png")
    outcomes = {"accepted": 0, "refused": 0, "trained": 0}
    for i in range(NUM_RUN_CASES):
        task = rng.choice(["classification", "classification", "detection"])
        keys = rng.sample(sorted(RUN_SETTINGS), rng.randint(1, 4))
        case = {}
        for key in keys:
            good, bad = RUN_SETTINGS[key]
            case[key] = rng.choice(bad) if rng.random() < 0.3 else rng.choice(good)
        world = rng.choice([1, 2])
        where = f"case {i} ({task}, {world} processes): {case}"
        cfg = _run_cfg(task, tmp_path / f"run{i}")
        for key, value in case.items():
            _set(cfg, key, value)
        try:
            check_run_settings(cfg, world_size=world)
        except ValueError as exc:
            assert _raised_by_us(exc), f"{where}\nValueError not raised by randwire_d2:\n{traceback.format_exc()}"
            message = one_line(exc)
            assert "\n" not in str(exc) and "cfg." in message, (where, message)
            outcomes["refused"] += 1
            continue
        except Exception:
            pytest.fail(f"{where}\nunexpected exception:\n{traceback.format_exc()}")
        outcomes["accepted"] += 1
        try:
            _exercise(cfg, task, image)
            if task == "classification" and outcomes["accepted"] % TRAIN_EVERY == 0:
                _train_two_iterations(cfg)
                outcomes["trained"] += 1
        except Exception:
            pytest.fail(f"{where}\naccepted, but the run failed:\n{traceback.format_exc()}")
    print(f"run-settings fuzz over {NUM_RUN_CASES} cases: {outcomes}")
    assert outcomes["accepted"] >= NUM_RUN_CASES // 5 and outcomes["refused"] >= NUM_RUN_CASES // 5, outcomes
    assert outcomes["trained"] >= 3, outcomes
