# ImageNet-1k classification data (configs/imagenet/Base-RandWire-ImageNet.yaml): folders
# train/<wnid>/*.JPEG and val/<wnid>/*.JPEG under `imagenet_root` (empty: env
# RANDWIRE_IMAGENET_ROOT, else ./datasets/imagenet). Resumable training stream.
from omegaconf import OmegaConf

from detectron2.config import LazyCall as L
from randwire_d2.data.classification import (
    ClassificationDatasetMapper,
    classification_test_loader,
    classification_train_loader,
)
from randwire_d2.evaluation import ClassificationEvaluator

IMAGENET_TRAIN_IMAGES = 1281167

dataloader = OmegaConf.create()

dataloader.train = L(classification_train_loader)(
    names="imagenet_train",
    mapper=L(ClassificationDatasetMapper)(
        is_train=True,
        crop_size=224,
        resize_size=256,
        image_format="RGB",
        train_augmentation="random_resized_crop",
        crop_scale=(0.08, 1.0),
        flip="horizontal",
        decode_device="auto",  # decode + augment batched on the GPU when there is one; None: PIL in workers
    ),
    total_batch_size=256,  # over all GPUs
    seed="${train.seed}",
    num_workers=8,  # per GPU process
    prefetch_factor=4,
    imagenet_root="",
)

dataloader.test = L(classification_test_loader)(
    names="imagenet_val",
    mapper=L(ClassificationDatasetMapper)(
        is_train=False, crop_size=224, resize_size=256, image_format="${...train.mapper.image_format}",
        decode_device="${...train.mapper.decode_device}",
    ),
    batch_size=64,  # per GPU process
    num_workers=8,
    prefetch_factor=4,
    imagenet_root="${..train.imagenet_root}",
)

dataloader.evaluator = L(ClassificationEvaluator)(
    dataset_name="${..test.names}", distributed=True, output_dir="${train.output_dir}/inference"
)
