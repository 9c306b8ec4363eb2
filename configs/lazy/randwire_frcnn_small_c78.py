# LazyConfig twin of configs/randwire_frcnn_small_c78.yaml: the small regime (C=78, ~0.58
# GFLOPs at 224, 5.6M params; res2 is a plain conv, res3..res5 wired), 1x COCO schedule.
from .randwire_frcnn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.regime = "small"
model.backbone.bottom_up.channels = 78
train.init_checkpoint = "pretrained/randwire_ws_small_c78.pkl"
train.output_dir = "output/lazy/randwire_frcnn_small_c78"
