#!/usr/bin/env python
"""Train or evaluate with LazyConfig (python) configs: detectron2's tools/lazyconfig_train_net.py
with RandWire checkpoints and exact resume.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/demo/randwire_frcnn_demo.py
    python tools/lazyconfig_train_net.py --config-file configs/lazy/randwire_frcnn.py --num-gpus 8 --resume
    python tools/lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=model_final.pth

The config has detectron2's layout (configs/lazy/common/train.py): ``model``,
``dataloader.{train,test,evaluator}``, ``optimizer`` (``params.model`` is set here),
``lr_multiplier`` and ``train``, plus ``train.seed``. Trailing ``key=value`` overrides.
Differences from detectron2's script, as in tools/train_net.py:

* checkpoints are written by ``RandWireCheckpointer`` (graph specs in every checkpoint,
  atomic writes, weights trained on other graphs refused);
* with a ``ResumableTrainLoader`` (configs/lazy/common/data) and ``train.seed``, ``--resume``
  continues exactly as an uninterrupted run (``ExactResumeHook``: data stream position,
  per-step RNG seeds, smoothed-metric history);
* CPU runs (``train.device=cpu``, ``--num-gpus N`` CPU processes over gloo), AMP turned off
  off CUDA, and the final metrics written to ``train.output_dir/final_metrics.json``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import randwire_d2  # noqa: E402,F401  (registers datasets and components)
from detectron2.engine import default_argument_parser  # noqa: E402
from randwire_d2.engine.lazyconfig_train_net import launch_from_args, main  # noqa: E402,F401


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        launch_from_args(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # ours name the key, file or value
        if os.environ.get("RANDWIRE_DEBUG") or (isinstance(exc, KeyError) and "Non-existent" not in str(exc)):
            raise
        sys.exit(f"error: {exc}\n(set RANDWIRE_DEBUG=1 for the traceback)")
