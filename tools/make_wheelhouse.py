#!/usr/bin/env python3
"""Gather every wheel an offline machine that already has torch/torchvision
(and numpy, Pillow, matplotlib, ...) needs to run randwire_d2 with detectron2.

    python tools/make_wheelhouse.py --python-version 3.12 --out /tmp/wh

Pure-python packages are fetched or built (from sdists) as wheels here;
pycocotools, the only compiled one, is downloaded as a binary wheel for the
target Python. Run with the project's interpreter (.venv/bin/python): building
detectron2 and randwire_d2 imports torch.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import install_detectron2 as inst  # noqa: E402  (sibling script, not a package)

# Pure-python distributions missing on a bare torch host; versions follow
# install_detectron2.RUNTIME_DEPS so both install paths agree.
PURE_PYTHON = [
    "fvcore", "iopath", "yacs", "omegaconf", "hydra-core", "antlr4-python3-runtime",
    "termcolor", "tabulate", "portalocker", "networkx",
]
BINARY = ["pycocotools"]
# Real ImageNet JPEGs for the GPU suite's loader section (read as files, never imported).
TEST_DATA = ["foolbox==3.3.4"]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64"]


def spec(name: str) -> str:
    """The requirement string for ``name`` from RUNTIME_DEPS, else the bare name."""
    for req in inst.RUNTIME_DEPS:
        if req.split("=")[0].split(">")[0].split("<")[0].lower() == name.lower():
            return req
    return name


def run(*cmd: str) -> None:
    print("  $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def gather_pure_python(out: Path) -> None:
    # pip wheel reuses published wheels and builds the sdist-only ones (fvcore, antlr4).
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), *map(spec, PURE_PYTHON), *TEST_DATA)


def gather_binary(out: Path, python_version: str) -> None:
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    run(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", python_version, "--implementation", "cp", *platform_args,
        "-d", str(out), *map(spec, BINARY))


def gather_detectron2(out: Path) -> None:
    info = inst.describe_installed()
    if info and info.get("has_C"):
        print("note: the installed detectron2 has C++ ops; the wheelhouse gets the "
              "pure-Python registry build (C++ ops unavailable on the target)")
    shutil.copy2(inst.build_wheel(), out)


def gather_randwire(out: Path) -> None:
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "-w", str(out), str(inst.REPO_ROOT))


def check_tags(out: Path, python_version: str) -> None:
    """Fail if a wheel cannot install on the target Python."""
    cp = "cp" + python_version.replace(".", "")
    for wheel in sorted(out.glob("*.whl")):
        python_tag, abi_tag = wheel.stem.split("-")[-3:-1]
        ok = "py3" in python_tag.split(".") or cp in python_tag.split(".") or abi_tag == "abi3"
        if not ok:
            raise SystemExit(f"{wheel.name} does not match Python {python_version}")
        print(f"  {wheel.name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python-version", default="3.12", help="target Python, e.g. 3.12")
    ap.add_argument("--out", type=Path, required=True, help="output directory for the wheels")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    gather_detectron2(out)
    gather_pure_python(out)
    gather_binary(out, args.python_version)
    gather_randwire(out)
    print(f"wheelhouse {out}:")
    check_tags(out, args.python_version)
    print("\ninstall on the target (torch/torchvision already there, no network needed):")
    print(f"  python3 -m pip install --no-index --no-deps --target /tmp/site {out}/*.whl"
          " && export PYTHONPATH=/tmp/site")
    return 0


if __name__ == "__main__":
    sys.exit(main())
