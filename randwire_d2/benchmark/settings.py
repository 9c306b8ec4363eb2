"""What a benchmark run measures: one object, filled from the command line or by a caller."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

from .measure import DTYPES

__all__ = ["PRESETS", "TINY_PRESETS", "Settings"]

PRESETS = {  # name: (regime, C, N)
    "small-c78": ("small", 78, 32),
    "regular-c109": ("regular", 109, 32),
    "regular-c154": ("regular", 154, 32),
}
TINY_PRESETS = {"tiny-c16": ("regular", 16, 10)}


@dataclass
class Settings:
    """Sizes and choices of a run; ``None`` sizes take the device's defaults in :meth:`resolve`."""

    device: str = "cpu"
    tiny: bool = False
    batch: Optional[int] = None
    image_size: Optional[int] = None
    det_batch: Optional[int] = None
    det_size: Optional[Tuple[int, int]] = None
    precisions: List[str] = field(default_factory=lambda: ["fp32", "bf16", "fp16"])
    executors: List[str] = field(default_factory=lambda: ["lean", "lean+recompute", "reference"])
    presets: List[str] = field(default_factory=lambda: list(PRESETS))
    channels_last: bool = False
    compile: bool = False
    cost_only: bool = False
    cost_batch: int = 4
    drop_path: float = 0.1  # the RandWire classifiers' (the ImageNet recipe's)
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    threads: Optional[int] = None
    skip_classification: bool = False
    skip_detection: bool = False
    count_work: bool = True

    def resolve(self) -> "Settings":
        """Check the choices (ValueError naming the option) and fill the device's defaults."""
        from ..modeling.stage import EXECUTORS

        bad = [p for p in self.precisions if p not in DTYPES]
        if bad:
            raise ValueError(f"--precisions: unknown {bad}; choose from {list(DTYPES)}")
        bad = [e for e in self.executors if e.partition("+")[0] not in EXECUTORS
               or e.partition("+")[2] not in ("", "recompute") or e == "reference+recompute"]
        if bad or not self.executors:
            raise ValueError(f"--executors: unknown {bad}; choose from {list(EXECUTORS)} (+recompute for lean)")
        bad = [p for p in self.presets if p not in PRESETS]
        if bad:
            raise ValueError(f"--presets: unknown {bad}; choose from {list(PRESETS)}")
        cuda, tiny = self.device == "cuda", self.tiny
        if self.batch is None:
            self.batch = 2 if tiny else (256 if cuda else 8)
        if self.image_size is None:
            self.image_size = 64 if tiny else 224
        if self.det_batch is None:
            self.det_batch = 1 if tiny or not cuda else 8
        if self.det_size is None:
            self.det_size = (128, 128) if tiny else ((800, 1216) if cuda else (512, 768))
        self.det_size = tuple(int(s) for s in self.det_size)
        if len(self.det_size) != 2:
            raise ValueError("--det-size takes H,W")
        if self.warmup is None:
            self.warmup = 1 if tiny else (5 if cuda else 2)
        if self.repeats is None:
            self.repeats = 3 if tiny else (20 if cuda else 5)
        if self.threads is None and tiny and not cuda:
            self.threads = 1  # CI machines are shared: OpenMP spin-waits under oversubscription
        return self

    def as_dict(self):
        return asdict(self)
