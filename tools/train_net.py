#!/usr/bin/env python
"""Train or evaluate RandWire models (Faster R-CNN FPN detection, ImageNet classification).

Same CLI as detectron2's tools/train_net.py:
    python tools/train_net.py --config-file configs/randwire_frcnn.yaml --num-gpus 8
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file CFG --resume          # continue after preemption
    python tools/train_net.py --config-file CFG --overwrite       # start afresh over a previous run

Multi-process: ``--num-gpus N`` is the number of processes per machine: one per GPU
(NCCL), or, with MODEL.DEVICE cpu, N CPU processes (gloo). Multi-machine: the same
command on every machine with ``--num-machines M --machine-rank R --dist-url tcp://HOST:PORT``
(HOST = machine 0). On one machine the default URL picks a free port.

Before any process starts, the settings are checked and OUTPUT_DIR is locked for this
run; a failure prints one ``error:`` line (RANDWIRE_DEBUG=1 for the traceback, which
is also in OUTPUT_DIR/log.txt once the run has started).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import randwire_d2  # noqa: E402,F401  (registers backbones, meta-arch, datasets)
from randwire_d2.engine import debug_enabled  # noqa: E402
from randwire_d2.engine.train_net import argument_parser, error_line, launch_from_args, main  # noqa: E402,F401


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        launch_from_args(args)
    except Exception as exc:
        if debug_enabled():
            raise
        sys.exit(error_line(exc))
