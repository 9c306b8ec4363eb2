"""randwire_d2.benchmark, the library behind tools/benchmark.py and tools/benchmark_loader.py."""
import json
import os

import pytest
import torch

from randwire_d2.benchmark import Settings
from randwire_d2.benchmark.measure import count_work, timed, unsupported, work_fields
from randwire_d2.benchmark.report import ratios, write_json


def test_settings_fill_the_device_defaults_and_name_bad_options():
    s = Settings(device="cuda").resolve()
    assert (s.batch, s.image_size, s.det_batch, s.det_size, s.warmup, s.repeats) == (256, 224, 8, (800, 1216), 5, 20)
    s = Settings(device="cpu", tiny=True).resolve()
    assert (s.batch, s.image_size, s.det_size, s.threads) == (2, 64, (128, 128), 1)
    with pytest.raises(ValueError, match="--precisions: unknown \\['fp8'\\]"):
        Settings(precisions=["fp8"]).resolve()
    with pytest.raises(ValueError, match="--executors"):
        Settings(executors=["reference+recompute"]).resolve()
    with pytest.raises(ValueError, match="--presets"):
        Settings(presets=["huge"]).resolve()


def test_timed_runs_warmup_plus_repeats_and_reports_the_median():
    calls = []
    median, raw, _ = timed(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7 and len(raw) == 5 and median >= 0
    assert unsupported(torch.device("cpu"), "fp16") == "unsupported"
    assert unsupported(torch.device("cpu"), "bf16") is None


def test_count_work_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    gflop, gbytes = count_work(lambda: a @ b)
    assert gflop == pytest.approx(2 * 8 * 16 * 4 / 1e9)
    assert gbytes == pytest.approx((8 * 16 + 16 * 4 + 8 * 4) * 4 / 1e9)
    fields = work_fields("train", gflop, gbytes, 0.5)
    assert fields["train_achieved_gbs"] == round(gbytes / 0.5, 2)


def test_ratios_pair_randwire_rows_with_their_baseline():
    cls = [
        {"model": "randwire-regular-c109", "preset": "regular-c109", "executor": "lean", "precision": "bf16",
         "status": "ok", "train_img_s": 50.0, "saved_mb_per_img": 120.0, "traffic_mb_per_img": 2400.0},
        {"model": "resnet50", "preset": None, "executor": None, "precision": "bf16", "status": "ok",
         "train_img_s": 100.0, "saved_mb_per_img": 80.0, "traffic_mb_per_img": 1000.0},
    ]
    det = [
        {"model": "randwire-fpn", "executor": "lean", "precision": "bf16", "status": "ok",
         "train_ms_iter": 130.0, "train_peak_mem_mb": 900.0},
        {"model": "r50-fpn", "executor": None, "precision": "bf16", "status": "ok",
         "train_ms_iter": 100.0, "train_peak_mem_mb": 1000.0},
    ]
    got = {r["what"]: r["ratio"] for r in ratios(cls, det)}
    assert got["classification train img/s randwire-regular-c109 / resnet50"] == 0.5
    assert got["saved_mb_per_img randwire-regular-c109 / resnet50"] == 1.5
    assert got["traffic_mb_per_img randwire-regular-c109 / resnet50"] == 2.4
    assert got["detection train ms/iter randwire-fpn / r50-fpn"] == 1.3
    assert got["detection train peak memory MB randwire-fpn / r50-fpn"] == 0.9


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json({"a": 1}, str(path))
    write_json({"a": 2}, str(path))
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_loader_report_covers_both_decode_paths(tmp_path):
    pytest.importorskip("PIL")
    import randwire_d2.data  # noqa: F401
    from detectron2.config import get_cfg

    from randwire_d2.benchmark.loader import foolbox_photo_tree, loader_report
    from randwire_d2.config import add_classification_config, add_randwire_config
    from randwire_d2.data.classification import register_image_folder

    root = foolbox_photo_tree(str(tmp_path), 16, size=(200, 150), classes=2)
    assert len(os.listdir(os.path.join(root, "n00000001"))) == 8
    register_image_folder("test_loader_report_tree", root)
    cfg = get_cfg()
    add_randwire_config(cfg)
    add_classification_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = ("test_loader_report_tree",)
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.INPUT.CROP_SIZE = 64
    report = loader_report(cfg, "test_loader_report_tree", device="cpu", workers=[0], batches=2, log=lambda *_: None)
    cpu, dev = report["paths"]["cpu"], report["paths"]["device"]
    assert cpu["decode_device"] is None and dev["decode_device"] == "cpu"
    assert set(cpu["stage_ms"]) == {"read", "decode", "augment", "to_tensor"}
    assert cpu["worker_img_s_per_core"] > 0 and dev["worker_img_s_per_core"] > 0 and dev["device_img_s"] > 0
    assert [r["workers"] for r in dev["loader"]] == [0] and dev["loader"][0]["img_s"] > 0


def test_detection_cost_rows_and_ratios_at_a_tiny_size(monkeypatch):
    import randwire_d2  # noqa: F401
    from randwire_d2.benchmark.detection_cost import COST_KEYS, detection_cost
    from randwire_d2.modeling import stage as stage_module

    lean_calls = []  # the row says lean: lean runs (EXECUTOR auto would run the reference on a CPU)
    real = stage_module.lean_forward
    monkeypatch.setattr(stage_module, "lean_forward", lambda s, x: lean_calls.append(1) or real(s, x))
    torch.set_num_threads(1)
    out = detection_cost(images=1, size=(64, 96), tiny=True, log=lambda *_: None)
    assert lean_calls
    rows = {r["model"]: r for r in out["rows"]}
    rw, r50 = rows["randwire-fpn"], rows["r50-fpn"]
    for r in (rw, r50):
        assert r["status"] == "ok" and r["norm"] == "FrozenBN" and r["freeze_at"] == 2
        assert r["trainable_params_m"] < r["params_m"]  # the stem is frozen
        assert all(r[k] > 0 for k in COST_KEYS) and isinstance(r["ops_per_step"], int)
        reg = r["regions"]
        assert reg["traffic_mb_per_img bottom_up"] > 0 and reg["traffic_mb_per_img fpn"] > 0
        parts = sum(v for k, v in reg.items() if k.startswith("traffic_mb_per_img"))
        assert parts == pytest.approx(r["traffic_mb_per_img"], abs=0.05)
    ratios = {x["what"]: x["ratio"] for x in out["ratios"]}
    assert ratios["detection traffic_mb_per_img randwire-fpn / r50-fpn"] == round(
        rw["traffic_mb_per_img"] / r50["traffic_mb_per_img"], 3)
    assert set(ratios) == {f"detection {k} randwire-fpn / r50-fpn" for k in COST_KEYS}


def test_training_cost_counts_ops_and_takes_list_inputs():
    from randwire_d2.cost import training_cost

    class Stacking(torch.nn.Module):  # takes a list of images, as detectron2's models do
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, images):
            return self.conv(torch.stack(images))

    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    a = training_cost(conv, x, loss_fn=lambda out: out.sum())
    b = training_cost(Stacking(conv), [x[0], x[1]], loss_fn=lambda out: out.sum())
    assert a["ops_per_step"] > 3 and a["ops_per_step"] == training_cost(conv, x, loss_fn=lambda o: o.sum())["ops_per_step"]
    assert b["saved_mb_per_img"] == pytest.approx(a["saved_mb_per_img"])  # per image: len(list) images


def test_executor_timing_times_each_executor_in_alternating_rounds(tmp_path, monkeypatch):
    """--executor-timing: the demo config's training step per executor, same process."""
    from conftest import REPO
    from randwire_d2.benchmark import executors

    monkeypatch.chdir(REPO)
    order = []
    real = executors.apply_executor
    monkeypatch.setattr(executors, "apply_executor", lambda m, e: order.append(e) or real(m, e))
    path = tmp_path / "exec.json"
    result = executors.time_executors(
        opts=["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "SOLVER.IMS_PER_BATCH", "2"],
        batches=1, rounds=2, json_path=str(path), log=lambda *_: None)
    # warm-up lean, reference; then round 0 lean first, round 1 reference first
    assert order == ["lean", "reference", "lean", "reference", "reference", "lean"]
    rows = {r["executor"]: r for r in result["rows"]}
    assert set(rows) == {"lean", "reference"} and all(len(r["rounds_s_per_it"]) == 2 for r in rows.values())
    assert all(r["s_per_it"] > 0 for r in rows.values())
    assert result["fastest"] == min(rows, key=lambda e: rows[e]["s_per_it"])
    assert json.loads(path.read_text())["rows"] == result["rows"]
