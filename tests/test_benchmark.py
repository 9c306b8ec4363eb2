"""tools/benchmark.py runs on CPU at its tiny size and writes the documented JSON fields."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLS_FIELDS = {
    "model", "preset", "regime", "channels", "nodes", "executor", "precision", "status", "params_m",
    "fvcore_gflops_per_image", "train_ms", "train_img_s", "train_times_ms", "train_peak_mem_mb",
    "infer_ms", "infer_img_s", "infer_times_ms", "infer_peak_mem_mb", "train_gflop", "train_gbytes",
    "train_achieved_tflops", "train_achieved_gbs", "infer_gflop", "infer_gbytes",
    "infer_achieved_tflops", "infer_achieved_gbs",
}
DET_FIELDS = {
    "model", "executor", "precision", "status", "params_m", "train_ms_iter", "train_times_ms",
    "train_peak_mem_mb", "infer_ms_image", "infer_times_ms", "infer_peak_mem_mb", "train_gflop",
    "train_gbytes", "train_achieved_tflops", "train_achieved_gbs", "infer_gflop", "infer_gbytes",
    "infer_achieved_tflops", "infer_achieved_gbs",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "--tiny", "--device", "cpu",
         "--executors", "lean,reference", "--json", str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(path) as f:
        return json.load(f), proc.stdout


def test_top_level_fields(result):
    data, stdout = result
    assert data["schema"] == 1
    for key in ("date", "command", "device", "versions", "settings", "memory_kind",
                "classification", "detection", "ratios"):
        assert key in data, key
    assert "--tiny" in data["command"] and "tools/benchmark.py" in data["command"]
    assert data["device"]["type"] == "cpu" and data["device"]["name"]
    assert set(data["versions"]) >= {"torch", "torchvision", "detectron2", "python", "fvcore"}
    s = data["settings"]
    assert s["tiny"] and s["batch"] == 2 and s["image_size"] == 64
    assert s["precisions"] == ["fp32", "bf16", "fp16"] and s["executors"] == ["lean", "reference"]
    assert "train img/s" in stdout and "train ms/it" in stdout  # the printed tables


def test_classification_rows(result):
    rows = result[0]["classification"]
    models = {r["model"] for r in rows}
    assert "resnet50" in models and any(m.startswith("randwire-") for m in models)
    for r in rows:
        if r["precision"] == "fp16":
            assert r["status"] == "unsupported"  # no fp16 autocast on CPU
            continue
        assert r["status"] == "ok", r
        assert CLS_FIELDS <= set(r), CLS_FIELDS - set(r)
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0
        assert len(r["train_times_ms"]) == result[0]["settings"]["repeats"]
        assert r["train_gflop"] > r["infer_gflop"] > 0 and r["train_gbytes"] > 0
    assert {r["executor"] for r in rows if r["model"] != "resnet50"} == {"lean", "reference"}


def test_detection_rows_and_ratios(result):
    data = result[0]
    rows = data["detection"]
    assert {r["model"] for r in rows} == {"randwire-fpn", "r50-fpn"}
    for r in rows:
        if r["precision"] == "fp16":
            assert r["status"] == "unsupported"
            continue
        assert r["status"] == "ok", r
        assert DET_FIELDS <= set(r), DET_FIELDS - set(r)
        assert r["train_ms_iter"] > 0 and r["infer_ms_image"] > 0
    whats = {x["what"] for x in data["ratios"]}
    assert any(w.startswith("detection train ms/iter") for w in whats)
    assert any(w.startswith("classification train img/s") for w in whats)


def test_gpu_suite_smoke_on_cpu_writes_every_section(tmp_path):
    """`tools/benchmark.py --suite gpu --device cpu --smoke`: the GPU proof's code, at tiny sizes."""
    from randwire_d2.benchmark.gpu_suite import SECTIONS

    path = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "--suite", "gpu", "--device", "cpu",
         "--smoke", "--json", str(path)],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(path.read_text())
    assert data["sections_done"] == list(SECTIONS) and data["smoke"] is True
    for section in SECTIONS:
        assert "status" not in data[section] if isinstance(data[section], dict) else True, data[section]
    env = data["environment"]
    assert {"torch", "torchvision", "detectron2", "cuda", "cudnn", "nccl", "driver", "device"} <= set(env)
    checks = data["correctness"]
    assert [c.get("precision") for c in checks[:3]] == ["fp32", "bf16", "fp16"]
    assert all(c["ok"] for c in checks), checks
    assert checks[3]["check"] == "DDP world size 1" and checks[3]["backend"] == "gloo"
    cls = data["classification"]
    assert {(r["model"].split("-")[0], r["executor"], r["layout"]) for r in cls} == {
        ("randwire", "lean", "nchw"), ("randwire", "lean", "channels_last"), ("randwire", "reference", "nchw"),
        ("randwire", "reference", "channels_last"), ("resnet50", None, "nchw"), ("resnet50", None, "channels_last")}
    assert all(r["status"] == "ok" and r["img_s"] > 0 and r["precision"] == "bf16" for r in cls)
    prof = data["profile"]
    assert prof["kernel_count"] > 100 and prof["top"] and prof["top"][0]["total_ms"] > 0
    det = {r["model"]: r for r in data["detection"] if "model" in r}
    assert det["randwire-fpn"]["status"] == "ok" and det["r50-fpn"]["status"] == "ok"
    assert det["randwire-fpn"]["norm"] == "FrozenBN" and det["randwire-fpn"]["freeze_at"] == 2
    assert any(r.get("ratio", "").startswith("train_ms_iter") for r in data["detection"])
    paths = data["loader"]["paths"]
    assert paths["cpu"]["loader"][0]["img_s"] > 0 and paths["device"]["device_img_s"] > 0


def test_gpu_suite_writes_json_after_each_section_and_survives_a_failure(tmp_path, monkeypatch):
    from randwire_d2.benchmark import gpu_suite

    path = tmp_path / "suite.json"
    seen = []

    def fake(name):
        def run(*args):
            if path.exists():  # what the previous sections wrote is already on disk
                seen.append((name, json.loads(path.read_text())["sections_done"]))
            if name == "profile":
                raise RuntimeError("boom")
            return {"name": name}
        return run

    monkeypatch.setattr(gpu_suite, "environment", fake("environment"))
    for name in gpu_suite.SECTIONS[1:]:
        monkeypatch.setattr(gpu_suite, name, fake(name))
    result = gpu_suite.run_gpu_suite(device="cpu", smoke=True, json_path=str(path), log=lambda *_: None)
    assert result["profile"]["status"] == "error: RuntimeError: boom"
    assert result["detection"] == {"name": "detection"} and result["loader"] == {"name": "loader"}
    assert seen[-1] == ("loader", list(gpu_suite.SECTIONS[:-1]))
    assert json.loads(path.read_text())["sections_done"] == list(gpu_suite.SECTIONS)


def test_cost_fields_and_ratios(result):
    """Every classification row carries the cost model (DropPath 0.1 by default), ResNet-50 too,
    and the ratios name each cost field of each RandWire executor."""
    data = result[0]
    assert data["settings"]["drop_path"] == 0.1
    cost = ("saved_mb_per_img", "traffic_mb_per_img", "traffic_fwd_bwd_mb_per_img", "ops_per_step")
    for r in data["classification"]:
        assert all(r[k] > 0 for k in cost), r
        assert isinstance(r["ops_per_step"], int)
    for executor in ("lean", "reference"):
        fields = {x["what"].split()[0] for x in data["ratios"] if x["executor"] == executor
                  and x["what"].endswith("/ resnet50") and not x["what"].startswith("classification")}
        assert fields == set(cost), (executor, fields)
