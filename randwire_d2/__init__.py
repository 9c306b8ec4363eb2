"""RandWire (Xie et al., ICCV 2019) backbones and classifier for detectron2.

Importing this package registers its backbones, meta-architecture and datasets.
"""
try:
    import detectron2  # noqa: F401
except ImportError as exc:  # one clear message instead of a deep traceback
    raise ImportError(
        "randwire_d2 needs detectron2, which is not installable from PyPI by name. "
        "Run `python tools/install_detectron2.py` (or `bash tools/setup.sh`) from the "
        "randwire_d2 checkout, or build upstream detectron2 from source."
    ) from exc

from . import data, modeling  # noqa: F401  (registers datasets, backbones, meta-arch)
from .config import add_randwire_config  # noqa: F401
from .graphs import GraphSpec, generate_graph  # noqa: F401

__version__ = "0.1.0"
