#!/usr/bin/env python
"""Draw each stage's random DAG, laid out by topological depth like the paper's figures.

The drawing code lives in randwire_d2/visualization.py (tools/sweep.py uses it too): x is
a node's depth; the stage's input and output nodes are the squares at either end.

Sources (exactly one):
    --config-file CFG [KEY VALUE ...]   the graphs the model of that config is built from
    --checkpoint PATH                   the graphs stored in a .pth checkpoint / converted .pkl
    --graphs-json PATH                  a JSON file {stage: spec} (or {"randwire_graphs": {...}})

    python tools/visualize_graph.py --config-file configs/imagenet/randwire_ws_small_c78.yaml --output graphs.png
    python tools/visualize_graph.py --checkpoint output/model_final.pth --output graphs.svg
    python tools/visualize_graph.py --config-file configs/randwire_frcnn.yaml --output g.png --per-stage \
        MODEL.RANDWIRE.GENERATOR BA MODEL.RANDWIRE.SEED 3
"""
import argparse
import os
import sys
import warnings
from typing import Dict, List, Sequence

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from randwire_d2.graphs import GraphSpec  # noqa: E402
from randwire_d2.visualization import (  # noqa: E402,F401  (re-exported for callers of this tool)
    COLORS, FORMATS, INPUT, OUTPUT, check_output, draw_graph_specs, draw_stage, layout, panel_title,
)


# ----------------------------------------------------------------------------- sources
def specs_from_config(config_file: str, opts: Sequence[str] = ()) -> Dict[str, GraphSpec]:
    from randwire_d2.analysis import load_config
    from randwire_d2.config import randwire_kwargs

    return randwire_kwargs(load_config(config_file, opts))["graphs"]


def specs_from_checkpoint(path: str) -> Dict[str, GraphSpec]:
    from randwire_d2.checkpoint import read_graph_specs

    return read_graph_specs(path)


def specs_from_json(path: str) -> Dict[str, GraphSpec]:
    from randwire_d2.config import load_graph_specs

    if not path.endswith(".json"):
        raise ValueError(f"--graphs-json expects a .json file, got {path!r}.")
    return load_graph_specs(path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config-file", metavar="FILE", help="draw the graphs this config builds")
    src.add_argument("--checkpoint", metavar="PATH", help="draw the graphs stored in this .pth/.pkl")
    src.add_argument("--graphs-json", metavar="PATH", help="draw the graphs in this JSON file")
    parser.add_argument("--output", required=True, metavar="PATH", help="output .png, .svg or .pdf")
    parser.add_argument("--per-stage", action="store_true", help="one file per stage: <stem>_<stage><ext>")
    parser.add_argument("--stages", nargs="+", metavar="STAGE", help="only these stages (e.g. res3 res4)")
    parser.add_argument("--no-labels", action="store_true", help="do not print node indices")
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="with --config-file: config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.opts and not args.config_file:
        parser.error(f"config overrides {args.opts} need --config-file")
    try:
        check_output(args.output)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv=None) -> List[str]:
    args = parse_args(argv)
    if args.config_file:
        specs, source = specs_from_config(args.config_file, args.opts), args.config_file
    elif args.checkpoint:
        specs, source = specs_from_checkpoint(args.checkpoint), args.checkpoint
    else:
        specs, source = specs_from_json(args.graphs_json), args.graphs_json
    paths = draw_graph_specs(
        specs, args.output, per_stage=args.per_stage, stages=args.stages,
        title=f"RandWire graphs of {os.path.basename(source)}", labels=not args.no_labels, dpi=args.dpi,
    )
    for name in args.stages or sorted(specs):
        print(panel_title(name, specs[name]))
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
