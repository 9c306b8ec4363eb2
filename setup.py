"""Packaging for randwire_d2, a Detectron2 plugin for RandWire networks.

detectron2 is deliberately not in install_requires: it is not installable by
name from a package index. Run ``python tools/install_detectron2.py`` (or
``bash tools/setup.sh``) to get it.
"""
from setuptools import find_packages, setup

setup(
    name="randwire_d2",
    version="0.1.0",
    description="RandWire (randomly wired) backbones for Detectron2",
    packages=find_packages(include=["randwire_d2*"]),
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
