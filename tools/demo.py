#!/usr/bin/env python
"""Run a trained detector on images and save visualisations (randwire_d2.engine.demo).

    python tools/demo.py --config-file configs/demo/randwire_frcnn_demo.yaml \
        --input path/to/images/ more.jpg "shots/*.png" --output vis/ \
        --confidence-threshold 0.5 --opts MODEL.WEIGHTS output/model_final.pth MODEL.DEVICE cpu
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout

from randwire_d2.engine.demo import collect_inputs, get_parser, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
