#!/usr/bin/env python
"""Parameters, FLOPs and activations of the RandWire network a config describes.

Like detectron2's tools/analyze_model.py, but for RandWire configs and in the paper's
*network generator* view: K networks are sampled (MODEL.RANDWIRE.SEED = base seed + i)
and the mean ± std over them is printed, plus a per-stage breakdown of the first one.

    python tools/analyze_model.py --config-file configs/imagenet/randwire_ws_small_c78.yaml --num-seeds 5
    python tools/analyze_model.py --config-file configs/randwire_frcnn.yaml --json out.json
    python tools/analyze_model.py --config-file configs/randwire_frcnn.yaml --detector --detector-size 800
    python tools/analyze_model.py --config-file configs/randwire_frcnn.yaml MODEL.RANDWIRE.GENERATOR ER

Classification configs (RandWireClassifier) are counted with their head
(MODEL.RANDWIRE.NUM_CLASSES classes); detection configs count the bottom-up RandWire
backbone alone (stem..res5, no head, so below the paper's classification numbers),
or with --detector the whole detector in inference mode on one synthetic image.
FLOPs are multiply-adds as fvcore counts them (conv, linear, eval batch norm), on CPU,
batch 1, --input-size px (default 224), with the reference stage executor. Detection
configs with NORM FrozenBN keep the BN scale/shift as buffers, so their parameter
counts exclude them.
"""
import argparse
import json
import logging
import os
import sys
import warnings

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from randwire_d2.analysis import (  # noqa: E402
    format_count,
    format_mean_std,
    load_config,
    network_generator_stats,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--num-seeds", type=int, default=5, help="networks sampled from the generator (default 5)")
    parser.add_argument("--input-size", type=int, nargs="+", default=[224], metavar="PX",
                        help="input H [W] for the network (default 224)")
    parser.add_argument("--detector", action="store_true",
                        help="detection configs: count the whole detector, not the bottom-up backbone")
    parser.add_argument("--detector-size", type=int, nargs="+", default=[800], metavar="PX",
                        help="with --detector: the synthetic image's H [W] (default 800)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, KEY VALUE pairs (e.g. MODEL.RANDWIRE.SEED 3)")
    args = parser.parse_args(argv)
    if args.num_seeds < 1:
        parser.error("--num-seeds must be >= 1")
    for name in ("input_size", "detector_size"):
        size = getattr(args, name)
        if len(size) > 2 or min(size) < 1:
            parser.error(f"--{name.replace('_', '-')} takes one or two positive sizes, got {size}")
    return args


def report(stats: dict, config_file: str) -> str:
    h, w = stats["input_size"]
    rw = f"{stats['regime']} C={stats['channels']} N={stats['nodes']} {stats['generator']}"
    lines = [
        f"{config_file}: {stats['model']} ({rw}) at {h}x{w}, "
        f"{stats['num_seeds']} seed(s) {stats['seeds'][0]}..{stats['seeds'][-1]}",
        f"  params      : {format_mean_std(stats['params'])}",
        f"  FLOPs (MAdd): {format_mean_std(stats['flops'])}",
        f"  activations : {format_mean_std(stats['activations'])}",
        "  FLOPs by operator (seed {}): {}".format(
            stats["seeds"][0], ", ".join(f"{k} {format_count(v)}" for k, v in stats["flops_by_operator"].items())
        ),
        f"  per stage (seed {stats['seeds'][0]}):",
        f"    {'part':<20} {'params':>10} {'FLOPs':>10} {'acts':>10}  graph",
    ]
    for name, part in stats["per_stage"].items():
        graph = ""
        if "nodes" in part:
            params = ", ".join(f"{k.upper()}={v}" for k, v in part["graph_params"].items())
            graph = (f"{part['generator']}({params}) {part['nodes']} nodes {part['edges']} edges, "
                     f"{part['channels']} ch, hash {part['hash']}")
        lines.append(
            f"    {name:<20} {format_count(part['params']):>10} {format_count(part['flops']):>10} "
            f"{format_count(part['activations']):>10}  {graph}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config_file, args.opts)
    size = args.detector_size if args.detector else args.input_size
    stats = network_generator_stats(cfg, args.num_seeds, size, detector=args.detector)
    result = {"config": args.config_file, "opts": list(args.opts), **stats}
    print(report(result, args.config_file))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"JSON written to {args.json}")
    return result


if __name__ == "__main__":
    main()
