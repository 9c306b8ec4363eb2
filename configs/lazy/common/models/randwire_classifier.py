# The ImageNet classifier (configs/imagenet/Base-RandWire-ImageNet.yaml): RandWire-WS(4, 0.75)
# regular regime C=109 with its head. Its parameter names (backbone.stem.*, backbone.res3.*,
# ...) match the detection backbone's by suffix, so its checkpoints load into the detector.
from detectron2.config import LazyCall as L
from randwire_d2.modeling import RandWireClassifier, RandWireNet, build_graph_specs

model = L(RandWireClassifier)(
    backbone=L(RandWireNet)(
        regime="regular",
        channels=109,
        graphs=L(build_graph_specs)(
            regime="${..regime}", num_nodes=32, generator="WS", params=dict(k=4, p=0.75), seed=0
        ),
        in_channels=3,
        norm="BN",
        drop_path=0.1,
        out_features=["linear"],
        num_classes=1000,
        head_channels=1280,
        dropout=0.2,
        freeze_at=0,
        executor="auto",
        recompute=False,
        compile=False,
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    label_smoothing=0.1,
)
