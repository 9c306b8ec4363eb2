# LR multipliers (fvcore ParamSchedulers) equal to the yaml configs' LR_SCHEDULER_NAME values,
# so that a LazyConfig and its yaml twin get the same learning rate at every iteration.
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def warmup_multistep(max_iter, steps, warmup_iters=1000, warmup_factor=0.001, gamma=0.1):
    """yaml "WarmupMultiStepLR": LR x gamma**k after the k-th step, linear warm-up."""
    steps = [s for s in steps if s <= max_iter]
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[gamma**k for k in range(len(steps) + 1)],  # gamma**2, not 0.01: bit-equal to yaml
            milestones=steps,
            num_updates=max_iter,
        ),
        warmup_length=min(warmup_iters / max_iter, 1.0),
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )


def warmup_cosine(max_iter, warmup_iters, warmup_factor=0.001):
    """yaml "WarmupCosineLR": half-period cosine from the base LR to 0, linear warm-up."""
    return L(WarmupParamScheduler)(
        scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
        warmup_length=min(warmup_iters / max_iter, 1.0),
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )


# Detectron's 1x COCO schedule: 90k iterations x 16 images, LR x0.1 at 60k and 80k.
lr_multiplier_1x = warmup_multistep(90000, (60000, 80000))
