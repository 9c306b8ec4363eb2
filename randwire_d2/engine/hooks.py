"""Training hooks: :class:`ExactResumeHook` (per-step RNG seeds, data seed and metric
history in the checkpoint), used by both the yaml and the LazyConfig trainers."""
import random
from typing import Optional

import numpy as np
import torch

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.resumable import _TAG_STEP, derive_seed

__all__ = ["ExactResumeHook"]


class ExactResumeHook(HookBase):
    """Makes a resumed run continue exactly like an uninterrupted one.

    * before every step, seeds python/numpy/torch RNGs from ``(seed, iteration, rank)``:
      the model's randomness (dropout, drop-path, RPN/ROI sampling) no longer depends on
      how many iterations this process has run;
    * its ``state_dict`` (saved inside the trainer's, i.e. in every checkpoint) carries
      the data seed and the last ``KEEP`` values of each logged scalar, restored into the
      EventStorage on resume so smoothed metrics (window medians) match too.
    """

    KEEP = 200

    def __init__(self, loader=None, seed: Optional[int] = None):
        self._loader = loader
        self._seed = seed
        self._pending_history = None

    @property
    def seed(self) -> Optional[int]:
        return self._loader.seed if self._loader is not None else self._seed

    def state_dict(self):
        state = {"data_seed": self.seed}
        storage = getattr(self.trainer, "storage", None)
        if storage is not None:
            state["history"] = {
                name: [(float(v), int(it)) for v, it in buf.values()[-self.KEEP:]]
                for name, buf in storage.histories().items()
            }
        return state

    def load_state_dict(self, state):
        seed = state.get("data_seed")
        if seed is not None:
            if self._loader is not None:
                self._loader.seed = int(seed)
            else:
                self._seed = int(seed)
        self._pending_history = state.get("history")

    def before_train(self):
        if self._pending_history:
            histories = self.trainer.storage.histories()
            start = self.trainer.start_iter
            for name, entries in self._pending_history.items():
                for value, iteration in entries:
                    if iteration < start:
                        histories[name].update(value, iteration)
        self._pending_history = None

    def before_step(self):
        if self.seed is not None:
            step_seed = derive_seed(self.seed, _TAG_STEP, self.trainer.iter, comm.get_rank())
            random.seed(step_seed)
            np.random.seed(step_seed)
            torch.manual_seed(step_seed)
