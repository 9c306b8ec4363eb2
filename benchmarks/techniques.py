"""Per-technique timing of the RandWire stage executors (the numbers behind the default).

    python benchmarks/techniques.py --channels 78 --regime small --batch 8 --image-size 224

Times classification training steps (forward + backward) and inference forwards of one
RandWireNet (WS(4, 0.75), N=32) under each variant below, median of ``--repeats`` after
``--warmup`` iterations, ``torch.set_num_threads(--threads)``:

* ``reference``              node-by-node loop (RandWireStage's own forward)
* ``reference+fused_agg``    same, each node's weighted sum as one stack + tensordot kernel
* ``batched``                equal-depth nodes as one grouped op (fast_stage.py)
* ``reference+channels_last`` / ``batched+channels_last``  model and input in NHWC
* ``batched+compile``        torch.compile of the whole network (``--compile``; slow to build)

Writes a JSON list of rows with ``--json``. On CUDA it synchronises around every timing.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from randwire_d2.modeling import node as node_module  # noqa: E402
from randwire_d2.modeling.fast_stage import set_executor  # noqa: E402
from randwire_d2.modeling.network import RandWireNet, build_graph_specs  # noqa: E402


def fused_aggregate(self, inputs):
    """NodeOp.aggregate with the weighted sum as one kernel (stack + tensordot)."""
    if self.agg_weight is None:
        return inputs[0]
    weights = self.aggregation_weights(inputs[0].shape[0], inputs[0].device).to(inputs[0].dtype)
    stacked = torch.stack(list(inputs), 0)
    if weights.dim() == 1:
        return torch.tensordot(weights, stacked, dims=1)
    return torch.einsum("kb,kbchw->bchw", weights, stacked)


def timed(fn, warmup, repeats, cuda):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, default=78)
    ap.add_argument("--regime", default="small")
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="reference,fused,batched,"
                    "reference+channels_last,batched+channels_last")
    ap.add_argument("--compile", action="store_true", help="also time batched+compile")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    graphs = build_graph_specs(args.regime, args.nodes, "WS", {"k": 4, "p": 0.75}, 0)
    torch.manual_seed(0)
    base = RandWireNet(regime=args.regime, channels=args.channels, graphs=graphs, num_classes=1000)
    base.to(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    variants = args.variants.split(",") + (["batched+compile"] if args.compile else [])
    original = node_module.NodeOp.aggregate
    rows = []
    for variant in variants:
        executor, *extras = variant.split("+")
        net = set_executor(base, executor)
        inp = x
        if "channels_last" in extras:
            net = net.to(memory_format=torch.channels_last)
            inp = x.contiguous(memory_format=torch.channels_last)
        else:
            net = net.to(memory_format=torch.contiguous_format)
        node_module.NodeOp.aggregate = fused_aggregate if "fused_agg" in extras else original
        model = torch.compile(net) if "compile" in extras else net
        try:
            def train():
                net.train()
                model(inp)["linear"].sum().backward()

            def infer():
                net.eval()
                with torch.no_grad():
                    model(inp)

            t_train = timed(train, args.warmup, args.repeats, cuda)
            t_infer = timed(infer, args.warmup, args.repeats, cuda)
        finally:
            node_module.NodeOp.aggregate = original
        row = {
            "variant": variant, "channels": args.channels, "regime": args.regime,
            "batch": args.batch, "image_size": args.image_size, "threads": args.threads,
            "train_ms": round(t_train * 1e3, 1), "infer_ms": round(t_infer * 1e3, 1),
            "train_img_s": round(args.batch / t_train, 2), "infer_img_s": round(args.batch / t_infer, 2),
        }
        rows.append(row)
        print(f"{variant:28s} train {row['train_ms']:9.1f} ms  infer {row['infer_ms']:9.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "argv": sys.argv, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
