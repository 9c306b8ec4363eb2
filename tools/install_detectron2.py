#!/usr/bin/env python3
"""Make detectron2 importable in the current interpreter.

* If a detectron2 already imports (e.g. upstream built from source), keep it.
* Otherwise fetch the registry's ``pb1-detectron2==0.6`` sdist (upstream v0.6
  Python without the C++ sources), verify its sha256, apply the small named
  compatibility patches below (each mirrors a fix upstream made later), build a
  pure-Python wheel named ``detectron2`` into a wheelhouse, and install it.
* Finish with a self-check that imports detectron2's main packages.

Stdlib only; pip is driven through subprocess. Torch must already be installed
(the sdist's setup.py imports it, hence ``--no-build-isolation``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WHEELHOUSE = REPO_ROOT / ".wheelhouse"
DEFAULT_CACHE = REPO_ROOT / ".cache" / "detectron2"

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
WHEEL_GLOB = f"detectron2-{SDIST_VERSION}-*.whl"

# What detectron2 v0.6 needs at import / training time. Installed explicitly
# (the wheel itself goes in with --no-deps) so the pins stay under our control.
# antlr4 4.9.x is what omegaconf 2.1-2.3 and hydra-core 1.1-1.3 require.
RUNTIME_DEPS = [
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7",
    "yacs>=0.1.8",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
    "antlr4-python3-runtime==4.9.*",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "tabulate",
    "portalocker",
    "cloudpickle",
    "tqdm>4.29.0",
    "matplotlib",
    "tensorboard",
    "Pillow>=7.1",
    "packaging",
]

SELF_CHECK_MODULES = (
    "detectron2.modeling",
    "detectron2.data",
    "detectron2.engine",
    "detectron2.evaluation",
    "detectron2.checkpoint",
)


class InstallError(RuntimeError):
    """A step failed in a way the user has to act on."""


class PatchError(InstallError):
    """A patch found neither the text it replaces nor the text it inserts."""


# --------------------------------------------------------------------------- #
# checksum
# --------------------------------------------------------------------------- #
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path, expected: str) -> None:
    """Raise InstallError unless ``path`` has the sha256 ``expected``."""
    actual = sha256_of(Path(path))
    if actual != expected.lower():
        raise InstallError(
            f"sha256 mismatch for {path}:\n  expected {expected}\n  got      {actual}\n"
            "Refusing to use it. Delete the file and re-run; if it persists, the "
            "registry serves a different artifact than the one this project was checked with."
        )


# --------------------------------------------------------------------------- #
# patches
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Patch:
    """Replace every ``old`` with ``new`` in ``file`` (relative to the sdist root).

    ``old`` must not occur inside ``new``: a file that contains ``new`` but not
    ``old`` counts as already patched, which makes applying twice a no-op.
    """

    name: str
    file: str
    old: str
    new: str


# Upstream later made the C++ extension optional: ops that need it fail only
# when called, with a message saying why.
_OPTIONAL_C_IMPORT = '''
try:
    from detectron2 import _C
except ImportError as _e:  # built without the C++ extension: fail only when an op is used
    class _MissingC:
        def __getattr__(self, name, _reason=str(_e)):
            raise ImportError(
                f"detectron2._C.{name} is unavailable: this detectron2 was built without "
                f"its C++/CUDA extension ({_reason}). Build detectron2 from source to use it."
            )

    _C = _MissingC()
'''

_COCOEVAL_FALLBACK = '''
try:
    from detectron2._C import COCOevalAccumulate  # noqa: F401  (probe for the C++ extension)
    from detectron2.evaluation.fast_eval_api import COCOeval_opt
except ImportError:  # no C++ extension: use pycocotools' pure-Python COCOeval
    COCOeval_opt = COCOeval
'''


def _optional_c(file: str) -> Patch:
    return Patch(f"optional _C import in {file}", file, "\nfrom detectron2 import _C\n", _OPTIONAL_C_IMPORT)


def _np_alias(alias: str, builtin: str, file: str) -> Patch:
    # numpy >= 1.24 removed np.bool/np.int/np.float/np.str; the builtins are equivalent.
    return Patch(f"numpy np.{alias} -> {builtin} in {file}", file, f"np.{alias})", f"{builtin})")


PATCHES: tuple[Patch, ...] = (
    # Pillow 10 removed Image.LINEAR (an alias of BILINEAR).
    Patch(
        "Pillow Image.LINEAR -> Image.BILINEAR",
        "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR",
        "interp=Image.BILINEAR",
    ),
    _optional_c("detectron2/layers/deform_conv.py"),
    _optional_c("detectron2/layers/rotated_boxes.py"),
    _optional_c("detectron2/layers/roi_align_rotated.py"),
    _optional_c("detectron2/evaluation/fast_eval_api.py"),
    Patch(
        "COCOEvaluator falls back to pycocotools COCOeval",
        "detectron2/evaluation/coco_evaluation.py",
        "\nfrom detectron2.evaluation.fast_eval_api import COCOeval_opt\n",
        _COCOEVAL_FALLBACK,
    ),
    _np_alias("bool", "bool", "detectron2/structures/masks.py"),
    _np_alias("bool", "bool", "detectron2/evaluation/pascal_voc_evaluation.py"),
    _np_alias("int", "int", "detectron2/evaluation/sem_seg_evaluation.py"),
    _np_alias("float", "float", "detectron2/evaluation/sem_seg_evaluation.py"),
    _np_alias("str", "str", "detectron2/data/datasets/pascal_voc.py"),
    _np_alias("int", "int", "detectron2/data/build.py"),
    _np_alias("bool", "bool", "detectron2/utils/visualizer.py"),
    _np_alias("bool", "bool", "detectron2/utils/video_visualizer.py"),
    # pkg_resources ships only with setuptools < 81; the configs sit next to the module.
    Patch(
        "model_zoo: drop pkg_resources import",
        "detectron2/model_zoo/model_zoo.py",
        "import pkg_resources\n",
        "# (pkg_resources not needed: configs are located relative to this file)\n",
    ),
    Patch(
        "model_zoo: find configs relative to the module",
        "detectron2/model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n'
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        '    )',
        'cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
    ),
    # Upstream later made caffe2 (gone from torch) optional in detectron2.export: without it
    # only the Caffe2Tracer API is lost, TracingAdapter and the TorchScript helpers remain.
    Patch(
        "export: caffe2 API optional",
        "detectron2/export/__init__.py",
        "from .api import *\n",
        "try:\n    from .api import *  # noqa: F401,F403  (needs caffe2)\nexcept ImportError:\n    pass\n",
    ),
    # Packaging: install as "detectron2" so `pip show detectron2` works.
    Patch("setup.py: distribution name detectron2", "setup.py", 'name="pb1-detectron2",', 'name="detectron2",'),
    # Not needed at import: black only formats LazyConfig.to_py output, and
    # future/pydot served the caffe2 export (upstream dropped both). Keeps `pip check` clean.
    Patch("setup.py: drop black pin", "setup.py", '"black==21.4b2",', "# black: optional (LazyConfig.to_py)"),
    Patch(
        "setup.py: drop caffe2-only requirements",
        "setup.py",
        '"future",  # used by caffe2\n        "pydot",  # used to save caffe2 SVGs\n',
        "# future, pydot: caffe2 export only\n",
    ),
    Patch(
        "setup.py: allow iopath 0.1.10 (what the registry's fvcore installs)",
        "setup.py",
        '"iopath>=0.1.7,<0.1.10",',
        '"iopath>=0.1.7",',
    ),
    # The sdist has no detectron2/layers/csrc: build pure Python.
    Patch("setup.py: no C++ extension", "setup.py", "ext_modules=get_extensions(),", "ext_modules=[],"),
    # The sdist already holds configs under detectron2/model_zoo/configs, but
    # get_model_zoo_configs() globs a top-level configs/ that is absent here.
    Patch(
        "setup.py: ship model-zoo configs",
        "setup.py",
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    ),
    # The sdist's tools/ has an __init__.py; a top-level "tools" package in
    # site-packages would shadow every project's own tools/ directory.
    Patch(
        "setup.py: do not install a top-level tools package",
        "setup.py",
        'find_packages(exclude=("configs", "tests*"))',
        'find_packages(exclude=("configs", "tests*", "tools", "tools.*"))',
    ),
)


def apply_patch(root, patch: Patch) -> str:
    """Apply ``patch`` under ``root``; return "applied" or "already applied"."""
    path = Path(root) / patch.file
    if not path.is_file():
        raise PatchError(f"patch {patch.name!r}: file {patch.file} not found under {root}")
    text = path.read_text(encoding="utf-8")
    if patch.old in text:
        path.write_text(text.replace(patch.old, patch.new), encoding="utf-8")
        return "applied"
    if patch.new in text:
        return "already applied"
    raise PatchError(
        f"patch {patch.name!r}: {patch.file} contains neither the expected text nor the "
        f"patched text; the source is not the one this patch was written for.\n"
        f"  expected: {patch.old!r}"
    )


def apply_all(root: Path) -> None:
    for patch in PATCHES:
        print(f"  patch {patch.name}: {apply_patch(root, patch)}")


def patches_fingerprint() -> str:
    """Changes whenever PATCHES change, so a stale cached wheel gets rebuilt."""
    blob = json.dumps([[p.name, p.file, p.old, p.new] for p in PATCHES] + [SDIST_SHA256])
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- #
# pip helpers
# --------------------------------------------------------------------------- #
def pip(*args: str, python: str = sys.executable) -> None:
    cmd = [python, "-m", "pip", *args]
    print("  $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def describe_installed(python: str = sys.executable) -> dict | None:
    """Import detectron2 in a fresh interpreter; None if it is not installed."""
    probe = (
        "import importlib.util, json, sys\n"
        "if importlib.util.find_spec('detectron2') is None: print('null'); sys.exit()\n"
        "info = {}\n"
        "try:\n"
        "    import detectron2\n"
        "    info.update(version=detectron2.__version__, location=detectron2.__path__[0])\n"
        "    info['has_C'] = importlib.util.find_spec('detectron2._C') is not None\n"
        "except Exception as e:\n"
        "    info['error'] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps(info))\n"
    )
    out = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- #
# build
# --------------------------------------------------------------------------- #
def fetch_sdist(cache: Path) -> Path:
    """Download (or reuse) the sdist and verify it."""
    sdist = cache / SDIST_FILE
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {SDIST_NAME}=={SDIST_VERSION} ...")
        # --no-build-isolation: pip prepares metadata by running setup.py, which imports torch.
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
            "-d", str(cache), f"{SDIST_NAME}=={SDIST_VERSION}")
    verify_sha256(sdist, SDIST_SHA256)
    print(f"sha256 OK: {sdist}")
    return sdist


def extract(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # refuse links/paths escaping dest (py>=3.11.4)
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def find_wheel(wheelhouse: Path) -> Path | None:
    """A cached wheel built with the current patches, if any."""
    stamp = wheelhouse / f"detectron2-{SDIST_VERSION}.patches"
    wheels = sorted(wheelhouse.glob(WHEEL_GLOB))
    if wheels and stamp.exists() and stamp.read_text().strip() == patches_fingerprint():
        return wheels[-1]
    return None


def build_wheel(wheelhouse: Path = DEFAULT_WHEELHOUSE, cache: Path = DEFAULT_CACHE) -> Path:
    """Return the patched detectron2 wheel, building it unless cached."""
    wheel = find_wheel(wheelhouse)
    if wheel:
        print(f"reusing {wheel}")
        return wheel
    sdist = fetch_sdist(cache)
    wheelhouse.mkdir(parents=True, exist_ok=True)
    for old in wheelhouse.glob(WHEEL_GLOB):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="d2build-") as tmp:
        extract(sdist, Path(tmp))
        src = Path(tmp) / f"{SDIST_NAME}-{SDIST_VERSION}"
        shutil.rmtree(src / f"{SDIST_NAME.replace('-', '_')}.egg-info", ignore_errors=True)
        print("applying patches:")
        apply_all(src)
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheelhouse), str(src))
    (wheelhouse / f"detectron2-{SDIST_VERSION}.patches").write_text(patches_fingerprint() + "\n")
    wheel = find_wheel(wheelhouse)
    if wheel is None:
        raise InstallError(f"pip wheel finished but no {WHEEL_GLOB} in {wheelhouse}")
    print(f"built {wheel}")
    return wheel


# --------------------------------------------------------------------------- #
# self-check
# --------------------------------------------------------------------------- #
# Required imports fail the check; what randwire_d2 can do without (detectron2.model_zoo,
# broken by setuptools >= 81 at HEAD; the model-zoo config files) only warns, with the fix.
_SELF_CHECK = f"""
import importlib, importlib.metadata, importlib.util, json
for name in {SELF_CHECK_MODULES!r}:
    importlib.import_module(name)
spec = importlib.util.spec_from_file_location("_randwire_compat", {str(REPO_ROOT / "randwire_d2" / "compat.py")!r})
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
warnings = []
try:
    compat.model_zoo_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
except FileNotFoundError as e:
    warnings.append(f"{{e}} Only tools/benchmark.py's R50-FPN baseline uses these configs.")
try:
    import detectron2.model_zoo
except ModuleNotFoundError as e:
    warnings.append(compat.MODEL_ZOO_HINT if e.name == "pkg_resources" else
                    f"detectron2.model_zoo does not import ({{e}}); randwire_d2 does not use it.")
import detectron2
print(json.dumps(dict(version=importlib.metadata.version("detectron2"), location=detectron2.__path__[0],
                      warnings=warnings)))
"""


def self_check(python: str = sys.executable) -> list:
    """Import detectron2's main packages in a fresh interpreter; raise on failure.

    Returns (and prints) warnings about optional parts that do not work, each with its fix."""
    proc = subprocess.run([python, "-c", _SELF_CHECK], capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"detectron2 self-check failed:\n{proc.stdout}{proc.stderr}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"detectron2 {info['version']} at {info['location']}")
    for warning in info["warnings"]:
        print(f"install_detectron2: WARNING (not fatal): {warning}")
    print("detectron2 self-check: OK" + (f" ({len(info['warnings'])} warning(s) above)" if info["warnings"] else ""))
    return info["warnings"]


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #
def install(wheelhouse: Path, cache: Path, reinstall: bool) -> None:
    info = describe_installed()
    if info and "error" not in info and not reinstall:
        c_ext = "with" if info["has_C"] else "without"
        print(f"keeping installed detectron2 {info['version']} at {info['location']} ({c_ext} C++ ops)")
        return
    if info and "error" in info:
        print(f"installed detectron2 does not import ({info['error']}); replacing it")
    wheel = build_wheel(wheelhouse, cache)
    print("installing detectron2 runtime dependencies:")
    pip("install", *RUNTIME_DEPS)
    pip("install", "--no-deps", "--force-reinstall", str(wheel))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheelhouse", type=Path, default=DEFAULT_WHEELHOUSE,
                    help="where the built wheel is kept and reused (default: %(default)s)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                    help="where the downloaded sdist is kept (default: %(default)s)")
    ap.add_argument("--reinstall", action="store_true",
                    help="install the patched registry build even if a detectron2 imports")
    ap.add_argument("--build-only", action="store_true",
                    help="only build/reuse the wheel and print its path (used by make_wheelhouse.py)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.build_only:
            print(build_wheel(args.wheelhouse.resolve(), args.cache_dir.resolve()))
            return 0
        install(args.wheelhouse.resolve(), args.cache_dir.resolve(), args.reinstall)
        self_check()
    except (InstallError, subprocess.CalledProcessError) as e:
        print(f"install_detectron2: ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
