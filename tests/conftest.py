import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import randwire_d2  # noqa: E402,F401  (registers components)
from randwire_d2.engine import setup_cfg  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_detection_cfg(config="configs/randwire_frcnn.yaml", *opts):
    """A repo config shrunk to a CPU-sized RandWire (C=16, N=10) with no pretrained weights."""
    cfg = setup_cfg(
        os.path.join(REPO, config),
        [
            "MODEL.WEIGHTS", "",
            "MODEL.DEVICE", "cpu",
            "MODEL.RANDWIRE.CHANNELS", 16,
            "MODEL.RANDWIRE.NODES", 10,
            "MODEL.RANDWIRE.NORM", "BN",
            "MODEL.BACKBONE.FREEZE_AT", 0,
            "MODEL.FPN.OUT_CHANNELS", 32,
            "SOLVER.AMP.ENABLED", False,
            *opts,
        ],
    )
    return cfg


@pytest.fixture
def tiny_cfg():
    return tiny_detection_cfg


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"

    def clear(self):
        self.text = ""


@pytest.fixture
def randwire_logs():
    """Messages logged under "randwire_d2" (caplog misses them once detectron2's setup_logger
    has turned that logger's propagation off)."""
    handler = _Messages()
    logger = logging.getLogger("randwire_d2")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def perturb_(module):
    """Non-trivial parameters and BN statistics (from torch's current RNG), so every op visibly matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_()
    return module
