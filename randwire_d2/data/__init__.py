"""Datasets of randwire_d2, registered (lazily, idempotently) on import:

* ``imagenet_train`` / ``imagenet_val`` (folder layout; root from
  ``DATASETS.IMAGENET_ROOT`` or ``RANDWIRE_IMAGENET_ROOT``),
* ``fashion_mnist_train`` / ``fashion_mnist_test`` (Debian ``dataset-fashion-mnist``),
* ``randwire_demo_train`` / ``randwire_demo_val`` (generated detection demo).
"""
from .classification import (  # noqa: F401
    ClassificationDatasetMapper,
    build_classification_test_loader,
    build_classification_train_loader,
    register_classification_datasets,
    register_image_folder,
)
from .demo import register_demo_datasets

register_classification_datasets()
register_demo_datasets()
