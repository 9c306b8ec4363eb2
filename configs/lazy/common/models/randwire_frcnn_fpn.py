# Faster R-CNN + FPN on a RandWire backbone: configs/Base-RandWire-FPN.yaml (detectron2's
# Base-RCNN-FPN with a RandWire bottom-up) + configs/randwire_frcnn.yaml's backbone
# (RandWire-WS(4, 0.75), regular regime, C=109), written with explicit-argument constructors.
# The graphs are data: `graphs` is any {stage: GraphSpec}; to rebuild a checkpoint's own
# graphs use L(read_graph_specs)(path="ckpt.pth") from randwire_d2.checkpoint.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads
from randwire_d2.modeling import RandWireNet, build_graph_specs

model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        bottom_up=L(RandWireNet)(
            regime="regular",
            channels=109,
            graphs=L(build_graph_specs)(
                regime="${..regime}", num_nodes=32, generator="WS", params=dict(k=4, p=0.75), seed=0
            ),
            in_channels=3,
            # pretrained BN statistics frozen; from scratch use "BN"/"SyncBN"/"GN" and freeze_at=0
            norm="FrozenBN",
            drop_path=0.0,
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=2,  # stem + res2, as for ResNets
            executor="auto",  # lean on CUDA, reference on CPU; or "lean" / "reference" everywhere
            recompute=False,  # lean only: least activation memory, more bytes moved
            compile=False,  # torch.compile the backbone
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        norm="",
        top_block=L(LastLevelMaxPool)(),
        fuse_type="sum",
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels="${...backbone.out_channels}", num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32], [64], [128], [256], [512]],
            aspect_ratios=[[0.5, 1.0, 2.0]],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=(1.0, 1.0, 1.0, 1.0)),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),
        post_nms_topk=(1000, 1000),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=80,
        batch_size_per_image=512,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        # L(ShapeSpec): v0.6's ShapeSpec is a namedtuple, which the config would turn into a list
        box_head=L(FastRCNNConvFCHead)(
            input_shape=L(ShapeSpec)(channels="${....backbone.out_channels}", height=7, width=7),
            conv_dims=[],
            fc_dims=[1024, 1024],
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=L(ShapeSpec)(channels=1024),
            box2box_transform=L(Box2BoxTransform)(weights=(10.0, 10.0, 5.0, 5.0)),
            num_classes="${..num_classes}",
            test_score_thresh=0.05,
            test_nms_thresh=0.5,
            test_topk_per_image=100,
        ),
    ),
    # RGB, 0..255: the ImageNet pretraining pipeline's (configs/lazy/imagenet)
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)
