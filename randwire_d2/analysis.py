"""Complexity of RandWire models: parameters, FLOPs (multiply-adds) and activations.

The paper reports a *network generator*, not a single network: its numbers are
means over several seeds. :func:`network_generator_stats` does exactly that for a
config (MODEL.RANDWIRE.SEED = base seed + i), :func:`complexity` counts one model.

Conventions (fvcore's): one multiply-add is one FLOP; convolutions, linear layers
and batch norms (eval: 2 per element with affine) are counted, element-wise ops
(ReLU, sigmoid, the weighted sums, pooling) are not. Activations are the output
elements of convolutions and linear layers. Everything runs on CPU, batch 1, with the
reference stage executor (the "lean" one has identical parameters and convolutions
inside autograd Functions, which fvcore's tracer does not look into).
"""
import logging
import math
import statistics
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .modeling.network import RandWireNet
from .modeling.stage import RandWireStage

__all__ = [
    "CLASSIFIER",
    "build_analysis_model",
    "complexity",
    "load_config",
    "network_generator_stats",
    "summarize",
]

logger = logging.getLogger(__name__)
CLASSIFIER = "RandWireClassifier"
Size = Union[int, Sequence[int]]


def load_config(config_file: str, opts: Sequence[str] = ()):
    """detectron2 defaults + MODEL.RANDWIRE (+ classification keys) + file + opts, on CPU."""
    from detectron2.config import get_cfg

    from . import config as rw_config

    cfg = get_cfg()
    rw_config.add_randwire_config(cfg)
    # Classification configs carry SOLVER.EPOCHS etc.; harmless for detection configs.
    add_cls = getattr(rw_config, "add_classification_config", None)
    if add_cls is not None:
        add_cls(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _hw(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"input size must be an int or (H, W), got {size!r}.")
    return size


def build_analysis_model(cfg, *, detector: bool = False) -> nn.Module:
    """The model a config describes, in eval mode on CPU.

    Classification config (META_ARCHITECTURE RandWireClassifier): the RandWireNet with
    its head (MODEL.RANDWIRE.NUM_CLASSES classes), exactly as the classifier builds it.
    Detection config: the bottom-up RandWire backbone alone (stem + res2..res5 up to
    MODEL.RANDWIRE.OUT_FEATURES, no head), or with ``detector=True`` the whole detector.
    """
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_model

    # Importing these registers the RandWire meta-architecture and backbones.
    from .modeling.backbone import build_randwire_backbone
    from .modeling.classifier import RandWireClassifier

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    if detector:
        if cfg.MODEL.META_ARCHITECTURE == CLASSIFIER:
            raise ValueError("--detector needs a detection config; this one is a RandWireClassifier.")
        model = build_model(cfg)
    elif cfg.MODEL.META_ARCHITECTURE == CLASSIFIER:
        model = RandWireClassifier.from_config(cfg)["backbone"]
    else:
        model = build_randwire_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
    return model.eval()


def _find_randwire(model: nn.Module) -> Tuple[str, Optional[RandWireNet]]:
    for name, module in model.named_modules():
        if isinstance(module, RandWireNet):
            return name, module
    return "", None


def _breakdown_modules(model: nn.Module) -> Dict[str, List[str]]:
    """{label: module names}: the RandWire parts (stem, res2..res5, head), then a detector's
    other parts (the rest of its backbone, e.g. the FPN, as one entry; RPN; ROI heads)."""
    prefix, net = _find_randwire(model)
    parts: Dict[str, List[str]] = {}
    if net is not None:
        dot = prefix + "." if prefix else ""
        for child, _ in net.named_children():
            parts[child] = [dot + child]
    if net is not model:  # a detector: its other top-level parts
        for child, module in model.named_children():
            if net is not None and module is net:
                continue
            if net is not None and prefix.startswith(child + "."):
                # the part holding the RandWireNet (the FPN backbone): its other children
                rest = [
                    f"{child}.{sub}" for sub, _ in module.named_children()
                    if not (prefix + ".").startswith(f"{child}.{sub}.")
                ]
                if rest:
                    label = "fpn" if type(module).__name__ == "FPN" else f"{child} (rest)"
                    parts[label] = rest
            else:
                parts[child] = [child]
    return parts


def _detector_inputs(model: nn.Module, size: Size):
    h, w = _hw(size)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=gen) * 255
    return [{"image": image, "height": h, "width": w}]


def _flatten_tensors(obj) -> list:
    """Every tensor in nested dicts/lists/Instances/Boxes, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _flatten_tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _flatten_tensors(x)]
    if hasattr(obj, "get_fields"):  # detectron2 Instances
        return _flatten_tensors(obj.get_fields())
    if hasattr(obj, "tensor"):  # Boxes and friends
        return [obj.tensor]
    return []


class _TracedDetector(nn.Module):
    """Tensor in, tuple of tensors out, around a detectron2 meta-architecture.

    (detectron2.export.TracingAdapter does the same, but importing detectron2.export
    needs caffe2, which modern PyTorch no longer ships.)
    """

    def __init__(self, model: nn.Module, batched_inputs):
        super().__init__()
        self.model = model
        self.image = batched_inputs[0]["image"]
        self._meta = {k: v for k, v in batched_inputs[0].items() if k != "image"}

    def forward(self, image):
        outputs = self.model([dict(self._meta, image=image)])
        return tuple(_flatten_tensors(outputs))


def _is_tensor_model(model: nn.Module) -> bool:
    """RandWireNet / plain backbones take a tensor; detectron2 meta-archs take list[dict]."""
    return isinstance(model, (RandWireNet,)) or not hasattr(model, "preprocess_image")


def complexity(model: nn.Module, input_size: Size = 224, *, in_channels: int = 3) -> dict:
    """Params, FLOPs and activations of ``model`` for one input of ``input_size`` (int or (H, W)).

    Returns ``{"params", "flops", "activations", "input_size", "flops_by_operator",
    "per_stage": {part: {"params", "flops", "activations"[, graph info]}}}``.
    ``model`` is a RandWireNet (tensor input) or a detectron2 meta-architecture
    (list-of-dicts input, evaluated in inference mode on a synthetic image).
    """
    from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis, parameter_count

    was_training = model.training
    model.eval()
    # Count the reference executor (node by node): its plain ops are what fvcore traces;
    # the weighted sums are element-wise, which the paper does not count either.
    executors = {}
    for m in model.modules():
        if isinstance(m, RandWireStage) and getattr(m, "executor", "reference") != "reference":
            executors[m] = m.executor
            m.executor = "reference"
    if _is_tensor_model(model):
        h, w = _hw(input_size)
        target, inputs = model, (torch.zeros(1, in_channels, h, w),)
        prefix = ""
    else:
        target = _TracedDetector(model, _detector_inputs(model, input_size))
        inputs = (target.image,)
        prefix = "model."  # the wrapper keeps the detector as .model
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings; unsupported-op notes silenced below
            flops = FlopCountAnalysis(target, inputs)
            acts = ActivationCountAnalysis(target, inputs)
            for counter in (flops, acts):
                counter.unsupported_ops_warnings(False)
                counter.uncalled_modules_warnings(False)
                counter.tracer_warnings("none")
            flops_by_module = flops.by_module()
            acts_by_module = acts.by_module()
            flops_by_op = dict(flops.by_operator())
    finally:
        model.train(was_training)
        for m, executor in executors.items():
            m.executor = executor
    params = parameter_count(model)

    per_stage = {}
    for label, names in _breakdown_modules(model).items():
        entry = {
            "params": int(sum(params.get(n, 0) for n in names)),
            "flops": int(sum(flops_by_module.get(prefix + n, 0) for n in names)),
            "activations": int(sum(acts_by_module.get(prefix + n, 0) for n in names)),
        }
        module = model.get_submodule(names[0])
        if len(names) == 1 and isinstance(module, RandWireStage):
            g = module.graph
            entry.update(
                generator=g.generator, graph_params=g.param_dict, seed=g.seed, nodes=g.num_nodes,
                edges=len(g.edges), hash=g.content_hash[:12],
                channels=module.out_channels,
            )
        per_stage[label] = entry
    return {
        "input_size": list(_hw(input_size)),
        "params": int(params[""]),
        "flops": int(flops_by_module[""]),
        "activations": int(acts_by_module[""]),
        "flops_by_operator": {k: int(v) for k, v in sorted(flops_by_op.items())},
        "per_stage": per_stage,
    }


def summarize(values: Sequence[float]) -> dict:
    """mean, sample std (0 for one value) and the values themselves."""
    values = [int(v) for v in values]
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def network_generator_stats(
    cfg, num_seeds: int = 5, input_size: Size = 224, *, detector: bool = False
) -> dict:
    """Complexity over ``num_seeds`` networks sampled from the config's generator.

    Network i uses MODEL.RANDWIRE.SEED = base seed + i. Returns ``{"num_seeds",
    "seeds", "input_size", "model", "params"/"flops"/"activations": {"mean", "std",
    "values"}, "flops_by_operator" and "per_stage" (first seed)}``. With
    MODEL.RANDWIRE.GRAPHS_FILE set the graphs come from that file, not from the
    seed, so one network is counted.
    """
    if not isinstance(num_seeds, int) or num_seeds < 1:
        raise ValueError(f"num_seeds must be a positive integer, got {num_seeds!r}.")
    rw = cfg.MODEL.RANDWIRE
    if rw.GRAPHS_FILE and num_seeds > 1:
        logger.warning(
            "MODEL.RANDWIRE.GRAPHS_FILE is set: the graphs come from %s, not from SEED; "
            "counting one network instead of %d.", rw.GRAPHS_FILE, num_seeds,
        )
        num_seeds = 1
    base = int(rw.SEED)
    seeds = [base + i for i in range(num_seeds)]
    results = []
    for seed in seeds:
        c = cfg.clone()
        c.defrost()
        c.MODEL.RANDWIRE.SEED = seed
        model = build_analysis_model(c, detector=detector)
        results.append(complexity(model, input_size, in_channels=len(c.MODEL.PIXEL_MEAN)))
        del model
    if detector:
        kind = "detector"
    elif cfg.MODEL.META_ARCHITECTURE == CLASSIFIER:
        kind = "classifier"
    else:
        kind = "backbone"
    return {
        "model": kind,
        "regime": rw.REGIME,
        "channels": rw.CHANNELS,
        "nodes": rw.NODES,
        "generator": "file:" + rw.GRAPHS_FILE if rw.GRAPHS_FILE else rw.GENERATOR,
        "num_seeds": num_seeds,
        "seeds": seeds,
        "input_size": results[0]["input_size"],
        "params": summarize([r["params"] for r in results]),
        "flops": summarize([r["flops"] for r in results]),
        "activations": summarize([r["activations"] for r in results]),
        "flops_by_operator": results[0]["flops_by_operator"],
        "per_stage": results[0]["per_stage"],
    }


def format_count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def format_mean_std(stats: dict) -> str:
    mean, std = stats["mean"], stats["std"]
    if not math.isfinite(std) or std == 0:
        return f"{format_count(mean)} ± 0"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1)):
        if abs(mean) >= scale:
            return f"{mean / scale:.3f}{unit} ± {std / scale:.3f}{unit}"
    return f"{mean} ± {std}"
