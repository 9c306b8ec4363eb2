"""detectron2 pieces reached without the parts that break on some installs.

``detectron2.model_zoo`` imports ``pkg_resources`` at upstream HEAD, and setuptools >= 81
no longer ships it: importing it is an ``ModuleNotFoundError`` there. randwire_d2 never
imports it; the model-zoo configs are plain files next to the package.
"""
import importlib.util
import os
from typing import List

MODEL_ZOO_HINT = (
    "detectron2.model_zoo imports pkg_resources, which setuptools >= 81 no longer ships "
    "(upstream detectron2 HEAD still imports it). randwire_d2 does not need it; to use "
    "detectron2's model_zoo API yourself: pip install 'setuptools<81'."
)


def _detectron2_dirs() -> List[str]:
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("detectron2 is not installed: run `python tools/install_detectron2.py`.")
    return list(spec.submodule_search_locations)


def model_zoo_config_file(config_path: str) -> str:
    """Path of a detectron2 model-zoo config, e.g. ``"COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"``,
    like ``model_zoo.get_config_file`` but without pkg_resources.

    Looks in ``detectron2/model_zoo/configs`` (installed builds, and the symlink an
    editable source build makes), then in the ``configs/`` of a source checkout."""
    looked = []
    for pkg in _detectron2_dirs():
        for root in (os.path.join(pkg, "model_zoo", "configs"), os.path.join(os.path.dirname(pkg), "configs")):
            path = os.path.join(root, config_path)
            if os.path.isfile(path):
                return path
            looked.append(root)
    raise FileNotFoundError(
        f"detectron2 model-zoo config {config_path!r} not found (looked in {looked}). This "
        "detectron2 was installed without its configs: reinstall it from a source checkout "
        "(pip install --no-build-isolation --use-pep517 -e .) or run "
        "`python tools/install_detectron2.py --reinstall`."
    )
