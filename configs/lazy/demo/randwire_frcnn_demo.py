# LazyConfig twin of configs/demo/randwire_frcnn_demo.yaml (the embedded demo): a small
# RandWire-WS FPN Faster R-CNN trained from scratch on CPU on the procedural shapes dataset,
# then COCO-evaluated. Same model, data stream, optimizer and LR at every iteration as the
# yaml demo (tests/test_lazyconfig.py checks it).
#   python tools/lazyconfig_train_net.py --config-file configs/lazy/demo/randwire_frcnn_demo.py
from ..common.data.coco import dataloader
from ..common.models.randwire_frcnn_fpn import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import warmup_multistep
from ..common.train import train

# from scratch: BN, nothing frozen
_bottom_up = model.backbone.bottom_up
_bottom_up.regime = "small"
_bottom_up.channels = 32
_bottom_up.graphs.num_nodes = 8
_bottom_up.norm = "BN"
_bottom_up.freeze_at = 0
_bottom_up.out_features = ["res3", "res4", "res5"]  # objects are 10..150 px: p3..p6 suffice
model.backbone.out_channels = 64
model.backbone.norm = "GN"  # from scratch, normalised FPN layers converge much faster

_rpn = model.proposal_generator
_rpn.in_features = ["p3", "p4", "p5", "p6"]
_rpn.anchor_generator.sizes = [[16], [32], [64], [128]]
_rpn.anchor_generator.strides = [8, 16, 32, 64]
_rpn.batch_size_per_image = 128
_rpn.pre_nms_topk = (1000, 500)
_rpn.post_nms_topk = (256, 200)

_roi = model.roi_heads
_roi.num_classes = 5
_roi.batch_size_per_image = 128
_roi.box_in_features = ["p3", "p4", "p5"]
_roi.box_pooler.scales = (1.0 / 8, 1.0 / 16, 1.0 / 32)
_roi.box_head.fc_dims = [256, 256]
_roi.box_predictor.input_shape.channels = 256

dataloader.train.dataset_dicts.names = "randwire_demo_train"
dataloader.train.mapper.augmentations[0].short_edge_length = (160, 192, 224)
dataloader.train.mapper.augmentations[0].max_size = 320
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 2
dataloader.test.dataset.names = "randwire_demo_val"
dataloader.test.mapper.augmentations[0].short_edge_length = 192
dataloader.test.mapper.augmentations[0].max_size = 320
dataloader.test.num_workers = 2

optimizer.lr = 0.001
optimizer.weight_decay = 0.05
lr_multiplier = warmup_multistep(1400, (1100, 1300), warmup_iters=50)

train.max_iter = 1400
train.checkpointer.period = 250
train.device = "cpu"
train.seed = 0
train.output_dir = "output/lazy_demo"
