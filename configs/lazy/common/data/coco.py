# COCO 2017 detection data, read from $DETECTRON2_DATASETS/coco (detectron2's layout), as
# configs/Base-RandWire-FPN.yaml. Training batches come from ResumableTrainLoader: global
# batch i is a function of (train.seed, i), so --resume continues exactly.
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from randwire_d2.data.resumable import ResumableTrainLoader
from randwire_d2.data.validation import SafeDatasetMapper
from randwire_d2.engine import detection_train_dicts, fast_coco_eval_available

dataloader = OmegaConf.create()

dataloader.train = L(ResumableTrainLoader)(
    dataset_dicts=L(detection_train_dicts)(
        names="coco_2017_train", num_classes="${model.roi_heads.num_classes}", filter_empty=True
    ),
    mapper=L(SafeDatasetMapper)(  # detectron2's DatasetMapper; errors name the image
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length=(640, 672, 704, 736, 768, 800), max_size=1333, sample_style="choice"
            ),
            L(T.RandomFlip)(horizontal=True, vertical=False),
        ],
        image_format="RGB",
    ),
    total_batch_size=16,
    seed="${train.seed}",
    num_workers=4,
    aspect_ratio_grouping=True,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(SafeDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333, sample_style="choice")],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}/inference",
    use_fast_impl=fast_coco_eval_available(),  # detectron2's C++ COCOeval when built with it
)
