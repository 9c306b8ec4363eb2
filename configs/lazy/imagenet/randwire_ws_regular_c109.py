# LazyConfig twin of configs/imagenet/randwire_ws_regular_c109.yaml: ImageNet-1k pretraining
# of RandWire-WS(4, 0.75), regular regime C=109 (paper: 79.0 top-1), the paper's recipe:
# 100 epochs at batch 256, SGD 0.9, LR 0.1 x batch/256 with 5 warm-up epochs then a
# half-period cosine, wd 5e-5 (not on norms, biases, aggregation weights), label smoothing
# 0.1, DropPath 0.1, dropout 0.2, AMP.
#   export RANDWIRE_IMAGENET_ROOT=/path/to/imagenet
#   python tools/lazyconfig_train_net.py --config-file configs/lazy/imagenet/randwire_ws_regular_c109.py --num-gpus 8
#   python tools/convert_pretrained.py output/lazy/imagenet/randwire_ws_regular_c109/model_final.pth \
#       pretrained/randwire_ws_regular_c109.pkl      # -> train.init_checkpoint of configs/lazy/randwire_frcnn.py
import math

from ..common.data.imagenet import IMAGENET_TRAIN_IMAGES, dataloader
from ..common.models.randwire_classifier import model
from ..common.optim import SGD as optimizer
from ..common.schedule import warmup_cosine
from ..common.train import train

EPOCHS, WARMUP_EPOCHS, BATCH = 100, 5, 256
iters_per_epoch = IMAGENET_TRAIN_IMAGES / BATCH

dataloader.train.total_batch_size = BATCH
optimizer.lr = 0.1 * BATCH / 256  # linear scaling rule
optimizer.momentum = 0.9
optimizer.weight_decay = 5e-5
train.max_iter = math.ceil(EPOCHS * iters_per_epoch)  # 500456
lr_multiplier = warmup_cosine(train.max_iter, round(WARMUP_EPOCHS * iters_per_epoch), warmup_factor=0.01)
train.amp.enabled = True
train.checkpointer.period = round(iters_per_epoch)  # every epoch
train.eval_period = round(5 * iters_per_epoch)
train.output_dir = "output/lazy/imagenet/randwire_ws_regular_c109"
