"""Packaging for randwire_d2, a Detectron2 plugin for RandWire networks.

detectron2 is deliberately not in install_requires: it is not installable by
name from a package index. Run ``python tools/install_detectron2.py`` (or
``bash tools/setup.sh``) to get it.

The top-level ``configs/`` is the one source of the configs; a build copies it into the
package as ``randwire_d2/model_zoo/configs`` (package data), so ``randwire_d2.model_zoo``
finds them in an installed package. Editable installs read ``configs/`` in place.
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_SUFFIXES = (".yaml", ".py")


class build_py_with_configs(build_py):
    """build_py + a copy of configs/ (yaml and LazyConfig .py, folders kept, so ``_BASE_``
    paths and relative imports resolve as in the checkout)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # the model zoo reads configs/ in place
            return
        source = os.path.join(HERE, "configs")
        target = os.path.join(self.build_lib, "randwire_d2", "model_zoo", "configs")
        if os.path.isdir(target):
            shutil.rmtree(target)
        for folder, _, files in os.walk(source):
            for name in files:
                if name.endswith(CONFIG_SUFFIXES):
                    rel = os.path.relpath(os.path.join(folder, name), source)
                    os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
                    shutil.copyfile(os.path.join(source, rel), os.path.join(target, rel))


setup(
    name="randwire_d2",
    version="0.1.0",
    description="RandWire (randomly wired) backbones for Detectron2",
    packages=find_packages(include=["randwire_d2*"]),
    cmdclass={"build_py": build_py_with_configs},
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "torchvision",
        "networkx",
        "fvcore",
        "pycocotools",
        "opencv-python-headless",  # detectron2's Visualizer (tools/demo.py) imports cv2
    ],
    extras_require={
        "slurm": ["submitit"],  # tools/sweep.py --launcher slurm
        "export": ["onnx", "onnxruntime"],  # tools/export_model.py --format onnx
        # submitit: the sweep's SLURM path; onnx + onnxruntime: the ONNX export test
        "test": ["pytest", "submitit", "onnx", "onnxruntime"],
    },
)
