# LazyConfig twin of configs/randwire_frcnn.yaml: Faster R-CNN FPN, RandWire-WS(4, 0.75)
# regular regime C=109, COCO 2017, Detectron's 1x schedule (90k iterations x 16 images,
# LR 0.02, x0.1 at 60k/80k), AMP, ImageNet-pretrained backbone (FrozenBN, stem+res2 frozen).
#   python tools/lazyconfig_train_net.py --config-file configs/lazy/randwire_frcnn.py --num-gpus 8
# train.init_checkpoint: pretrain with configs/lazy/imagenet/randwire_ws_regular_c109.py, then
# python tools/convert_pretrained.py .../model_final.pth pretrained/randwire_ws_regular_c109.pkl
from .common.data.coco import dataloader
from .common.models.randwire_frcnn_fpn import model
from .common.optim import SGD as optimizer
from .common.schedule import lr_multiplier_1x as lr_multiplier
from .common.train import train

train.init_checkpoint = "pretrained/randwire_ws_regular_c109.pkl"
train.max_iter = 90000
train.amp.enabled = True
train.checkpointer.period = 5000
train.output_dir = "output/lazy/randwire_frcnn_c109"
optimizer.lr = 0.02
