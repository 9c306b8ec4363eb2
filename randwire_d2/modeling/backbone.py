"""Registered detectron2 backbones: plain RandWire (res2..res5), FPN (p2..p6), RetinaNet FPN (p3..p7)."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7

from ..config import randwire_kwargs
from ..registry import register_once
from .network import STAGES, RandWireNet


def _check_fpn_inputs(cfg, bottom_up: RandWireNet):
    # FPN needs strides doubling level to level, and its top block reads the res5 level
    feats, stages = list(cfg.MODEL.FPN.IN_FEATURES), list(STAGES)
    if not feats or feats[0] not in stages or feats != stages[stages.index(feats[0]):]:
        raise ValueError(
            f"cfg.MODEL.FPN.IN_FEATURES = {feats} is invalid: consecutive stages ending at res5, "
            "e.g. ['res2', 'res3', 'res4', 'res5'] or ['res3', 'res4', 'res5']."
        )
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"cfg.MODEL.FPN.IN_FEATURES {list(cfg.MODEL.FPN.IN_FEATURES)} needs {missing}, which "
            f"cfg.MODEL.RANDWIRE.OUT_FEATURES {list(cfg.MODEL.RANDWIRE.OUT_FEATURES)} does not output."
        )


@register_once(BACKBONE_REGISTRY)
def build_randwire_backbone(cfg, input_shape: ShapeSpec) -> RandWireNet:
    """RandWire with the features in MODEL.RANDWIRE.OUT_FEATURES (res2..res5, strides 4..32)."""
    return RandWireNet(
        in_channels=input_shape.channels,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        **randwire_kwargs(cfg),
    )


@register_once(BACKBONE_REGISTRY)
def build_randwire_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """RandWire + FPN + max-pooled P6: p2..p6, for Faster/Mask R-CNN."""
    bottom_up = build_randwire_backbone(cfg, input_shape)
    _check_fpn_inputs(cfg, bottom_up)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@register_once(BACKBONE_REGISTRY)
def build_randwire_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """RandWire + FPN with P6/P7 from res5: p3..p7, for RetinaNet."""
    bottom_up = build_randwire_backbone(cfg, input_shape)
    _check_fpn_inputs(cfg, bottom_up)
    if "res5" not in bottom_up.output_shape():
        raise ValueError("The RetinaNet FPN builds P6/P7 from res5: add res5 to MODEL.RANDWIRE.OUT_FEATURES.")
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(bottom_up.output_shape()["res5"].channels, out_channels),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
