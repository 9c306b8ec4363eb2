"""Training precision: SOLVER.AMP.PRECISION (yaml) and train.amp.precision (LazyConfig).

detectron2 v0.6's AMPTrainer hard-codes fp16 autocast with a GradScaler (and needs CUDA);
the GPU benchmarks measure bf16. :class:`PrecisionTrainer` runs a training step in the
chosen precision on detectron2 v0.6 and HEAD alike:

* ``fp32``: no autocast;
* ``bf16``: autocast to bfloat16, no gradient scaler (bf16 has fp32's exponent range);
* ``fp16``: autocast to float16 with a GradScaler (its state is checkpointed under
  "grad_scaler", as detectron2's AMPTrainer does).

``auto`` (the default): bf16 on a CUDA device that supports it, else fp16 if
SOLVER.AMP.ENABLED, else fp32; always fp32 on CPU. (The memory format, a model setting, is
``MODEL.RANDWIRE.MEMORY_FORMAT``: ``randwire_d2.config.resolve_channels_last``.)
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from detectron2.engine import SimpleTrainer

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_type(device) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def resolve_precision(cfg) -> str:
    """"fp32", "bf16" or "fp16" from cfg.SOLVER.AMP.PRECISION (names the key when it is wrong)."""
    return precision_for(cfg.SOLVER.AMP.get("PRECISION", "auto"), cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED,
                         "cfg.SOLVER.AMP.PRECISION")


def precision_for(value: str, device, amp_enabled: bool, key: str) -> str:
    """The precision a training step runs in; ``key`` names the setting in errors."""
    if value not in PRECISIONS:
        raise ValueError(f"{key} = {value!r} is invalid: allowed are {list(PRECISIONS)}.")
    cuda = _device_type(device) == "cuda" and torch.cuda.is_available()
    if value == "auto":
        if not cuda:
            return "fp32"
        if torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if amp_enabled else "fp32"
    if value == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"{key} = 'bf16' but {torch.cuda.get_device_name()} has no bfloat16 "
            "support: use 'fp16' (with a gradient scaler) or 'fp32'."
        )
    return value


class PrecisionTrainer(SimpleTrainer):
    """SimpleTrainer whose forward runs under autocast to ``precision`` (fp16: with a GradScaler)."""

    def __init__(self, model, data_loader, optimizer, precision: str, device="cuda"):
        super().__init__(model, data_loader, optimizer)
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {list(DTYPES)}, got {precision!r}.")
        self.precision, self.device_type = precision, _device_type(device)
        self.grad_scaler: Optional[torch.amp.GradScaler] = (
            torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        )

    def autocast(self):
        dtype = DTYPES[self.precision]
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None)

    def run_step(self):
        assert self.model.training, "[PrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with self.autocast():  # the forward and the loss; backward follows the forward's dtypes
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
        else:
            self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
