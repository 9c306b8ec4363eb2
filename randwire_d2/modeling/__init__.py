from .backbone import (
    build_randwire_backbone,
    build_randwire_fpn_backbone,
    build_randwire_retinanet_fpn_backbone,
)
from .network import RandWireNet, build_graph_specs, stage_layout
from .node import NodeOp
from .stage import RandWireStage
from .classifier import RandWireClassifier
