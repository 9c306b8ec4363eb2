"""ImageNet classification meta-architecture: the RandWire network plus its head."""
from typing import Dict, List

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ..config import randwire_kwargs
from ..registry import register_once
from .network import RandWireNet


@register_once(META_ARCH_REGISTRY)
class RandWireClassifier(nn.Module):
    """``backbone`` is a RandWireNet with its head, so its parameter names
    ('backbone.stem.*', 'backbone.res3.*', ...) match the detection backbone's
    ('backbone.bottom_up.stem.*', ...) by suffix.

    Inputs: a list of dicts with "image" (C, H, W, in cfg.INPUT.FORMAT, 0..255) and,
    in training, "label" (int). Training returns {"loss_cls"}; inference returns per
    image {"scores": softmax probabilities}.
    """

    @configurable
    def __init__(self, *, backbone: RandWireNet, pixel_mean, pixel_std, label_smoothing: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        rw = cfg.MODEL.RANDWIRE
        kwargs = randwire_kwargs(cfg)
        if not (isinstance(rw.NUM_CLASSES, int) and rw.NUM_CLASSES >= 2):
            raise ValueError(f"cfg.MODEL.RANDWIRE.NUM_CLASSES = {rw.NUM_CLASSES!r} is invalid: an integer >= 2.")
        if not 0.0 <= rw.LABEL_SMOOTHING < 1.0:
            raise ValueError(f"cfg.MODEL.RANDWIRE.LABEL_SMOOTHING = {rw.LABEL_SMOOTHING!r} is invalid: in [0, 1).")
        kwargs["out_features"] = ["linear"]
        backbone = RandWireNet(
            in_channels=len(cfg.MODEL.PIXEL_MEAN),
            num_classes=rw.NUM_CLASSES,
            head_channels=rw.HEAD_CHANNELS,
            dropout=float(rw.DROPOUT),
            freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
            **kwargs,
        )
        return {
            "backbone": backbone,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "label_smoothing": rw.LABEL_SMOOTHING,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> torch.Tensor:
        stacked = getattr(batched_inputs, "images", None)  # the loaders' ImageBatch: one copy
        if isinstance(stacked, torch.Tensor):
            images = stacked.to(self.device, non_blocking=True).float()
        else:
            images = [x["image"].to(self.device, non_blocking=True) for x in batched_inputs]
            sizes = {tuple(img.shape) for img in images}
            if len(sizes) != 1:
                raise ValueError(
                    f"Classification batches need equal image sizes (crop in the mapper); got {sorted(sizes)}."
                )
            images = torch.stack(images).float()
        return (images - self.pixel_mean) / self.pixel_std

    def forward(self, batched_inputs: List[Dict]):
        logits = self.backbone(self.preprocess_image(batched_inputs))["linear"]
        if self.training:
            labels = getattr(batched_inputs, "labels", None)
            if isinstance(labels, torch.Tensor):
                labels = labels.to(logits.device, non_blocking=True)
            else:
                labels = torch.as_tensor([x["label"] for x in batched_inputs], device=logits.device)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            return {"loss_cls": loss}
        scores = logits.float().softmax(dim=1)
        return [{"scores": s} for s in scores]
