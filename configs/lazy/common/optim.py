# Optimizers whose parameter groups keep weight decay off norms, biases and the nodes'
# aggregation weights (randwire_d2.solver, as the yaml path). `params.model` is set to the
# model by tools/lazyconfig_train_net.py before instantiation.
import torch

from detectron2.config import LazyCall as L
from randwire_d2.solver import optimizer_param_groups

SGD = L(torch.optim.SGD)(
    params=L(optimizer_param_groups)(base_lr="${..lr}", weight_decay="${..weight_decay}", weight_decay_norm=0.0),
    lr=0.02,
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
)

AdamW = L(torch.optim.AdamW)(
    params=L(optimizer_param_groups)(base_lr="${..lr}", weight_decay="${..weight_decay}", weight_decay_norm=0.0),
    lr=1e-3,
    betas=(0.9, 0.999),
    weight_decay=0.05,
)
