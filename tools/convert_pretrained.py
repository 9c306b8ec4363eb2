#!/usr/bin/env python
"""Turn a RandWire ImageNet pretraining checkpoint into a detection-ready .pkl.

    python tools/convert_pretrained.py output/imagenet/randwire_ws_regular_c109/model_final.pth \
        randwire_ws_regular_c109.pkl

The .pkl holds the backbone only (classifier head dropped, 'backbone.' stripped) as
numpy arrays, with "matching_heuristics": True and the graph specs the network was
trained on; point MODEL.WEIGHTS of configs/randwire_frcnn.yaml at it. Build the
detector with the same RandWire settings (REGIME, CHANNELS, NODES, GENERATOR, SEED),
or with MODEL.RANDWIRE.GRAPHS_FILE set to the .pkl to reuse its graphs exactly.
"""
import argparse
import os
import sys
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_checkpoint(path: str) -> Mapping:
    import torch

    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path!r} does not exist.")
    try:
        # our own checkpoints hold plain containers, but also graph-spec dicts and
        # optimizer/scheduler state: weights_only would refuse nothing useful here,
        # yet only load files you trust.
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SystemExit(
            f"error: cannot read {path!r} as a PyTorch checkpoint ({type(exc).__name__}: {exc}). "
            "Expected a .pth written by tools/train_net.py with a RandWireClassifier config."
        )
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        kind = type(data).__name__ if not isinstance(data, Mapping) else f"dict with keys {sorted(data)[:8]}"
        raise SystemExit(
            f"error: {path!r} is not a detectron2/randwire_d2 checkpoint (found a {kind}; need a dict with "
            "'model': state_dict)."
        )
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="pretraining checkpoint (.pth) of a RandWireClassifier")
    parser.add_argument("output", help="detection-ready .pkl to write")
    args = parser.parse_args(argv)

    from randwire_d2.checkpoint import GRAPHS_KEY, HEAD_PREFIX, to_detection_pkl
    from randwire_d2.graphs import specs_from_dict

    data = load_checkpoint(args.checkpoint)
    keys = list(data["model"])
    if not any(k.split("module.", 1)[-1].startswith(HEAD_PREFIX) for k in keys):
        print(
            f"warning: {args.checkpoint!r} has no classifier head ({HEAD_PREFIX}*): it may not be a "
            "pretraining checkpoint; converting its 'backbone.*' weights anyway.",
            file=sys.stderr,
        )
    if GRAPHS_KEY not in data:
        print(
            f"warning: {args.checkpoint!r} carries no graph specs ('{GRAPHS_KEY}'); the detector must be "
            "built with the same GENERATOR/SEED/NODES to get the same wiring.",
            file=sys.stderr,
        )
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    try:
        count = to_detection_pkl(data, args.output)
    except ValueError as exc:
        raise SystemExit(f"error: {args.checkpoint!r}: {exc}")
    print(f"Wrote {args.output}: {count} backbone tensors (of {len(keys)} in the checkpoint).")
    if GRAPHS_KEY in data:
        specs = specs_from_dict(data[GRAPHS_KEY])
        for name, spec in sorted(specs.items()):
            print(f"  {name}: {spec.num_nodes} nodes, {len(spec.edges)} edges, "
                  f"{spec.generator} {spec.param_dict}, seed {spec.seed}, hash {spec.content_hash[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
