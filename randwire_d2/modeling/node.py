"""A RandWire node: weighted aggregation -> ReLU -> 3x3 depthwise -> 1x1 -> norm."""
from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, get_norm


def keep_from_uniform(u: torch.Tensor, rate: float) -> torch.Tensor:
    """DropPath's keep mask from uniforms ``u`` (..., inputs, batch): edge kept iff ``u >= rate``,
    and a sample that lost every edge keeps the one with the largest ``u``.

    Given that all were dropped, the largest of i.i.d. uniforms is a uniformly random edge:
    the rescue draws nothing more. Branch-free and without host syncs (torch.compile, CUDA
    graphs); padding entries set to -1 are never kept.
    """
    return u >= u.amax(dim=-2, keepdim=True).clamp_max(rate)


def drop_path_mask(num_inputs: int, batch: int, rate: float, device, generator=None) -> torch.Tensor:
    """(num_inputs, batch) 0/1 mask that drops input edges, keeping at least one per sample."""
    return keep_from_uniform(torch.rand(num_inputs, batch, device=device, generator=generator), rate)


class NodeOp(nn.Module):
    """Aggregates ``num_inputs`` tensors with positive weights sigmoid(w), then transforms.

    Nodes fed by the stage input use ``stride=2`` and change ``in_channels`` to
    ``out_channels``; every other node keeps its channel count.
    """

    def __init__(
        self,
        num_inputs: int,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        norm="BN",
        drop_path: float = 0.0,
    ):
        super().__init__()
        if num_inputs < 1:
            raise ValueError(f"A node needs at least one input, got num_inputs={num_inputs}.")
        self.num_inputs = num_inputs
        self.drop_path = float(drop_path)
        # w = 0 -> every input starts at weight 0.5.
        self.agg_weight = nn.Parameter(torch.zeros(num_inputs)) if num_inputs > 1 else None
        self.conv_dw = Conv2d(
            in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False
        )
        self.conv_pw = Conv2d(
            in_channels, out_channels, 1, bias=False, norm=get_norm(norm, out_channels)
        )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        for conv in (self.conv_dw, self.conv_pw):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def aggregation_weights(self, batch: int, device) -> torch.Tensor:
        """Per-input (and, with DropPath in training, per-sample) weights: (k,) or (k, batch).

        A RandWireStage draws the weights of all its nodes in one go
        (``RandWireStage.aggregation_weights``, same distribution); this is a node on its own.
        """
        weights = torch.sigmoid(self.agg_weight)
        if self.training and self.drop_path > 0.0:
            keep = drop_path_mask(self.num_inputs, batch, self.drop_path, device)
            # 1/(1-rate): the expected weight of an edge is the same in training and eval
            weights = weights[:, None] * keep.to(weights.dtype) / (1.0 - self.drop_path)
        return weights

    def aggregate(self, inputs: Sequence[torch.Tensor], weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Weighted sum of ``inputs``; ``weights`` (k,) or (k, batch), default: this node's own."""
        if self.agg_weight is None:
            return inputs[0]
        if weights is None:
            weights = self.aggregation_weights(inputs[0].shape[0], inputs[0].device)
        # (k,) or (k, batch) -> broadcastable against each (batch, C, H, W) input
        weights = weights.to(inputs[0].dtype).reshape(self.num_inputs, -1, 1, 1, 1)
        out = inputs[0] * weights[0]
        for x, w in zip(inputs[1:], weights[1:]):
            out = out + x * w
        return out

    def forward(self, inputs: List[torch.Tensor], weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if len(inputs) != self.num_inputs:
            raise ValueError(f"Node built for {self.num_inputs} inputs got {len(inputs)}.")
        x = F.relu(self.aggregate(inputs, weights))
        return self.conv_pw(self.conv_dw(x))
