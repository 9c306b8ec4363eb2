"""The RandWire network (stem, stages, classification head) as a detectron2 Backbone.

One class serves both uses: the classifier builds it with a head, the detection
backbone without, so their parameter names are identical by construction.
"""
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import Backbone

from ..graphs import GraphSpec, generate_graph, stage_seed
from .stage import DEFAULT_EXECUTOR, RandWireStage, check_executor

REGIMES = ("small", "regular")
STAGES = ("res2", "res3", "res4", "res5")
FEATURES = ("stem",) + STAGES + ("linear",)
STRIDES = {"stem": 2, "res2": 4, "res3": 8, "res4": 16, "res5": 32}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def stage_layout(regime: str, channels: int, num_nodes: int) -> Dict[str, dict]:
    """Per stage: output channels and, for randomly wired stages, the node count.

    Small regime: conv2 is a plain 3x3 conv and conv3..conv5 have C, 2C, 4C channels;
    regular regime: conv2 is wired with N/2 nodes and conv2..conv5 have C..8C.
    """
    if regime == "small":
        return {
            "res2": {"channels": channels, "nodes": None},
            "res3": {"channels": channels, "nodes": num_nodes},
            "res4": {"channels": 2 * channels, "nodes": num_nodes},
            "res5": {"channels": 4 * channels, "nodes": num_nodes},
        }
    if regime == "regular":
        return {
            "res2": {"channels": channels, "nodes": num_nodes // 2},
            "res3": {"channels": 2 * channels, "nodes": num_nodes},
            "res4": {"channels": 4 * channels, "nodes": num_nodes},
            "res5": {"channels": 8 * channels, "nodes": num_nodes},
        }
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}.")


def build_graph_specs(
    regime: str, num_nodes: int, generator: str, params: Mapping[str, float], seed: int
) -> Dict[str, GraphSpec]:
    """One graph per randomly wired stage, each from its own derived seed."""
    specs = {}
    for name, stage in stage_layout(regime, 2, num_nodes).items():
        if stage["nodes"] is None:
            continue
        try:
            specs[name] = generate_graph(generator, stage["nodes"], stage_seed(seed, name), **params)
        except ValueError as exc:
            raise ValueError(f"Stage {name} ({stage['nodes']} nodes, {regime} regime): {exc}") from None
    return specs


class ConvStage(nn.Module):
    """Small regime conv2: ReLU, 3x3 conv (stride 2), norm."""

    def __init__(self, in_channels: int, out_channels: int, *, norm="BN"):
        super().__init__()
        self.conv = Conv2d(
            in_channels, out_channels, 3, stride=2, padding=1, bias=False,
            norm=get_norm(norm, out_channels),
        )
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.conv(F.relu(x))


class Stem(nn.Module):
    """conv1: 3x3 conv to C/2 channels, stride 2, norm."""

    def __init__(self, in_channels: int, out_channels: int, *, norm="BN"):
        super().__init__()
        self.conv1 = Conv2d(
            in_channels, out_channels, 3, stride=2, padding=1, bias=False,
            norm=get_norm(norm, out_channels),
        )
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.conv1(x)


class ClassifierHead(nn.Module):
    """ReLU, 1x1 conv to ``head_channels``, norm, ReLU, global average pool, dropout, FC."""

    def __init__(self, in_channels: int, num_classes: int, *, head_channels=1280, norm="BN", dropout=0.0):
        super().__init__()
        self.conv = Conv2d(in_channels, head_channels, 1, bias=False, norm=get_norm(norm, head_channels))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(head_channels, num_classes)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # adaptive: any input size works
        return self.fc(self.dropout(x))


class RandWireNet(Backbone):
    """RandWire network with explicit arguments (no config access).

    Args:
        regime: "small" or "regular" (paper Table 1).
        channels: C, the width of the first wired stage.
        graphs: a GraphSpec per randomly wired stage that is built ("res2".."res5";
            res2 only in the regular regime). Use :func:`build_graph_specs`.
        out_features: any of "stem", "res2".."res5", "linear". Stages after the
            last requested one are not built (unused parameters break DDP).
        num_classes: builds the classification head; needed for "linear".
        freeze_at: 0 none, 1 the stem, k>=2 the stem and res2..res{k}.
        executor: how stages run their DAG: "auto" (default: lean on CUDA, reference on CPU),
            "lean" or "reference" (same parameters).
        recompute: lean (and "auto", which then runs lean everywhere); keep just node outputs
            for backward and recompute the rest (least activation memory, more bytes moved:
            benchmarks/README.md).
        compile: ``torch.compile`` this network in place (parameter names unchanged); under
            compilation the stages run the reference ops, which inductor fuses.
        compile_mode: torch.compile's mode; "reduce-overhead" captures the step in CUDA
            graphs (for fixed input sizes: launches replayed at once).
        channels_last: parameters and the input in channels_last (NHWC) memory format, so
            every activation is NHWC end to end.
    """

    def __init__(
        self,
        *,
        regime: str,
        channels: int,
        graphs: Mapping[str, GraphSpec],
        in_channels: int = 3,
        norm="BN",
        drop_path: float = 0.0,
        out_features: Optional[Sequence[str]] = None,
        num_classes: Optional[int] = None,
        head_channels: int = 1280,
        dropout: float = 0.0,
        freeze_at: int = 0,
        executor: str = DEFAULT_EXECUTOR,
        recompute: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        channels_last: bool = False,
    ):
        super().__init__()
        check_executor(executor, recompute)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)}, got {compile_mode!r}.")
        if out_features is None:
            out_features = ["linear"] if num_classes else ["res5"]
        out_features = list(out_features)
        bad = [f for f in out_features if f not in FEATURES]
        if not out_features or bad:
            raise ValueError(f"out_features {out_features} invalid: choose from {list(FEATURES)}.")
        if "linear" in out_features and not num_classes:
            raise ValueError("out_features 'linear' needs num_classes > 0.")
        layout = stage_layout(regime, channels, 32)
        last = max(FEATURES.index(f) for f in out_features)
        self.regime, self.channels = regime, channels
        self._out_features = out_features
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}

        stem_channels = channels // 2
        if norm == "GN":  # detectron2's GN uses 32 groups
            widths = [stem_channels] + [layout[n]["channels"] for n in STAGES]
            if any(w % 32 for w in widths):
                raise ValueError(
                    f"norm 'GN' (32 groups) needs every width divisible by 32; C={channels} gives "
                    f"stem C/2={stem_channels} and stages {widths[1:]}. Use C a multiple of 64."
                )
        self.stem = Stem(in_channels, stem_channels, norm=norm)
        self._record("stem", stem_channels)
        self.stage_names: List[str] = []
        prev = stem_channels
        for index, name in enumerate(STAGES, start=1):
            if index > last:
                break
            out = layout[name]["channels"]
            if layout[name]["nodes"] is None:
                stage = ConvStage(prev, out, norm=norm)
            else:
                if name not in graphs:
                    raise ValueError(f"No graph spec given for randomly wired stage {name}.")
                stage = RandWireStage(
                    graphs[name], prev, out, norm=norm, drop_path=drop_path, executor=executor,
                    recompute=recompute,
                )
            self.add_module(name, stage)
            self.stage_names.append(name)
            self._record(name, out)
            prev = out
        self.head = None
        if "linear" in out_features:
            self.head = ClassifierHead(prev, num_classes, head_channels=head_channels, norm=norm, dropout=dropout)
        self.freeze(freeze_at)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            self.compile(mode=None if compile_mode == "default" else compile_mode)

    def _record(self, name: str, channels: int):
        self._out_feature_channels[name] = channels
        self._out_feature_strides[name] = STRIDES[name]

    @property
    def graph_specs(self) -> Dict[str, GraphSpec]:
        """The graphs this network was built from, by stage name."""
        return {
            name: stage.graph
            for name in self.stage_names
            if isinstance(stage := getattr(self, name), RandWireStage)
        }

    @property
    def size_divisibility(self) -> int:
        # Inputs padded to a multiple of 32 give every stage an exact H/stride size.
        return 32

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
            if name != "linear"
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.stem.conv1.in_channels:
            raise ValueError(
                f"RandWireNet expects (N, {self.stem.conv1.in_channels}, H, W) input, got {tuple(x.shape)}."
            )
        outputs = {}
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        if self.head is not None:
            outputs["linear"] = self.head(x)
        return outputs

    def freeze(self, freeze_at: int = 0) -> "RandWireNet":
        """Freeze the stem (1) and stages res2..res{freeze_at}, as detectron2's ResNet does.

        Frozen parts stop getting gradients and their BatchNorms become FrozenBN.
        """
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in [0, 5], got {freeze_at}.")
        parts = ["stem"] + [f"res{i}" for i in range(2, freeze_at + 1)] if freeze_at else []
        for name in parts:
            module = getattr(self, name, None)
            if module is None:
                continue
            for p in module.parameters():
                p.requires_grad_(False)
            frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(module)
            for m in frozen.modules():
                if isinstance(m, FrozenBatchNorm2d):
                    # HEAD keeps BN's step counter as a buffer, v0.6 has none: drop it so
                    # frozen checkpoints have the same keys on both
                    m.num_batches_tracked = None
            setattr(self, name, frozen)
        return self
