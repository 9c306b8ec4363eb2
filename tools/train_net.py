#!/usr/bin/env python
"""Train or evaluate RandWire models (Faster R-CNN FPN detection, ImageNet classification).

Same CLI as detectron2's tools/train_net.py:
    python tools/train_net.py --config-file configs/randwire_frcnn.yaml --num-gpus 8
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file CFG --resume          # continue after preemption

Multi-process: ``--num-gpus N`` is the number of processes per machine: one per GPU
(NCCL), or, with MODEL.DEVICE cpu, N CPU processes (gloo). Multi-machine: the same
command on every machine with ``--num-machines M --machine-rank R --dist-url tcp://HOST:PORT``
(HOST = machine 0).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import randwire_d2  # noqa: E402,F401  (registers backbones, meta-arch, datasets)
from detectron2.engine import default_argument_parser  # noqa: E402
from randwire_d2.checkpoint import RandWireCheckpointer  # noqa: E402
from randwire_d2.data.custom import check_detection_datasets  # noqa: E402
from randwire_d2.engine import Trainer, is_classification, setup, setup_cfg  # noqa: E402
from randwire_d2.launch import launch  # noqa: E402


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        RandWireCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def launch_from_args(args):
    """Run ``main`` in ``args.num_gpus`` processes per machine (GPUs, or CPU processes with
    MODEL.DEVICE cpu) on ``args.num_machines`` machines."""
    # read the config once here: a typo fails before any process starts, and the
    # device picks the backend (NCCL on GPUs, gloo on CPU)
    cfg = setup_cfg(args.config_file, args.opts)
    device = cfg.MODEL.DEVICE
    if args.num_gpus * args.num_machines > 1 and not is_classification(cfg):
        check_detection_datasets(cfg, eval_only=args.eval_only)  # one clear error, not one per worker
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=device,
    )


def _user_error(exc: BaseException) -> bool:
    """Our validation errors name the key, file or value: show them without a traceback."""
    if isinstance(exc, KeyError):  # yacs: a typo in a config key
        return "Non-existent config key" in str(exc)
    return isinstance(exc, (ValueError, FileNotFoundError))


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        launch_from_args(args)
    except Exception as exc:
        if not _user_error(exc) or os.environ.get("RANDWIRE_DEBUG"):
            raise
        sys.exit(f"error: {exc}\n(set RANDWIRE_DEBUG=1 for the traceback)")
