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
