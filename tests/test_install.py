"""Tests for tools/install_detectron2.py: checksum, patches, self-check. No network."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load_installer():
    # Load by path: tools/ is not a package, and the name "tools" may be taken.
    spec = importlib.util.spec_from_file_location("install_detectron2", TOOLS / "install_detectron2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


inst = _load_installer()


def _write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- checksum
def test_checksum_match_accepted(tmp_path):
    f = _write(tmp_path, "a.tar.gz", "payload")
    inst.verify_sha256(f, inst.sha256_of(f))


def test_checksum_mismatch_refused(tmp_path):
    f = _write(tmp_path, "a.tar.gz", "tampered payload")
    with pytest.raises(inst.InstallError, match="sha256 mismatch"):
        inst.verify_sha256(f, inst.SDIST_SHA256)


def test_checksum_mismatch_exits_nonzero(tmp_path):
    # A corrupted cached sdist must stop the build, not be used.
    _write(tmp_path / "cache", inst.SDIST_FILE, "not the real sdist")
    argv = ["--build-only", "--cache-dir", str(tmp_path / "cache"), "--wheelhouse", str(tmp_path / "wh")]
    assert inst.main(argv) != 0
    assert not list((tmp_path / "wh").glob("*.whl"))


# --------------------------------------------------------------------------- patches
def test_patch_names_unique_and_old_not_in_new():
    names = [p.name for p in inst.PATCHES]
    assert len(names) == len(set(names))
    for p in inst.PATCHES:
        assert p.old and p.old not in p.new, p.name  # required for idempotency


@pytest.mark.parametrize("patch", inst.PATCHES, ids=lambda p: p.name)
def test_patch_applies_once_then_noop(tmp_path, patch):
    original = f"# header\n{patch.old}\n# footer\n"
    path = _write(tmp_path, patch.file, original)

    assert inst.apply_patch(tmp_path, patch) == "applied"
    patched = path.read_text()
    assert patch.new in patched and patch.old not in patched

    assert inst.apply_patch(tmp_path, patch) == "already applied"
    assert path.read_text() == patched


@pytest.mark.parametrize("patch", inst.PATCHES, ids=lambda p: p.name)
def test_patch_fails_loudly_on_unexpected_text(tmp_path, patch):
    _write(tmp_path, patch.file, "something else entirely\n")
    with pytest.raises(inst.PatchError) as err:
        inst.apply_patch(tmp_path, patch)
    assert patch.name in str(err.value) and patch.file in str(err.value)


def test_patch_fails_loudly_on_missing_file(tmp_path):
    patch = inst.PATCHES[0]
    with pytest.raises(inst.PatchError, match="not found"):
        inst.apply_patch(tmp_path, patch)


def test_optional_c_patch_is_valid_python_and_defers_error(tmp_path):
    # The patched import must compile and raise only when an op is looked up.
    patch = next(p for p in inst.PATCHES if p.file.endswith("rotated_boxes.py"))
    code = patch.new.replace("from detectron2 import _C", "from _no_such_pkg_ import _C")
    namespace = {}
    exec(compile(code, "patched", "exec"), namespace)
    with pytest.raises(ImportError, match="without its C\\+\\+"):
        namespace["_C"].box_iou_rotated


# --------------------------------------------------------------------------- self-check
def test_detectron2_self_check(capsys):
    inst.self_check()
    assert "self-check: OK" in capsys.readouterr().out



def _fake_detectron2(root: Path, model_zoo_init: str, with_configs: bool) -> None:
    # the packages the self-check imports, empty; model_zoo as upstream HEAD ships it
    for pkg in ("", "modeling", "data", "engine", "evaluation", "checkpoint"):
        _write(root, "/".join(filter(None, ("detectron2", pkg, "__init__.py"))), "")
    _write(root, "detectron2/model_zoo/__init__.py", model_zoo_init)
    if with_configs:
        _write(root, "detectron2/model_zoo/configs/COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "VERSION: 2\n")
    _write(root, "detectron2-0.6.dist-info/METADATA", "Metadata-Version: 2.1\nName: detectron2\nVersion: 0.6\n")


def test_self_check_warns_with_fix_when_head_model_zoo_needs_pkg_resources(tmp_path, monkeypatch, capsys):
    # upstream HEAD + setuptools >= 81: detectron2.model_zoo raises on import; set-up must go on
    no_pkg_resources = "raise ModuleNotFoundError(\"No module named 'pkg_resources'\", name='pkg_resources')\n"
    _fake_detectron2(tmp_path, no_pkg_resources, with_configs=True)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    warnings = inst.self_check()
    out = capsys.readouterr().out
    assert "self-check: OK" in out and str(tmp_path) in out
    assert len(warnings) == 1 and "setuptools<81" in warnings[0] and "does not need it" in warnings[0]


def test_self_check_warns_when_model_zoo_configs_are_missing(tmp_path, monkeypatch):
    _fake_detectron2(tmp_path, "", with_configs=False)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    warnings = inst.self_check()
    assert len(warnings) == 1 and "faster_rcnn_R_50_FPN_1x.yaml" in warnings[0] and "benchmark" in warnings[0]


def test_self_check_fails_when_a_required_package_does_not_import(tmp_path, monkeypatch):
    _fake_detectron2(tmp_path, "", with_configs=True)
    _write(tmp_path, "detectron2/engine/__init__.py", "raise ImportError('broken engine')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(inst.InstallError, match="broken engine"):
        inst.self_check()

def test_pip_show_detectron2():
    out = subprocess.run(
        [sys.executable, "-m", "pip", "show", "detectron2"], capture_output=True, text=True, check=True
    ).stdout
    assert "Version:" in out
