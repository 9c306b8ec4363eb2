"""Training/evaluation glue shared by tools/train_net.py: one Trainer for detection
and classification, picking loaders, evaluators and optimizer by meta-architecture."""
import json
import logging
import os
from collections import OrderedDict

import torch

from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator
from detectron2.data import MetadataCatalog
from detectron2.utils import comm

from .checkpoint import RandWireCheckpointer
from .config import add_randwire_config

logger = logging.getLogger("randwire_d2")
CLASSIFIER = "RandWireClassifier"
RESULTS_FILE = "final_metrics.json"


def is_classification(cfg) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == CLASSIFIER


def fast_coco_eval_available() -> bool:
    """detectron2's fast COCO eval needs its C++ extension (absent in the registry build)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


class Trainer(DefaultTrainer):
    """DefaultTrainer with RandWire checkpoints (graph specs, atomic writes, spec checks),
    the classification data path, and weight decay kept off norms and aggregation weights."""

    def __init__(self, cfg):
        if cfg.SOLVER.AMP.ENABLED and not torch.cuda.is_available():
            # detectron2's AMPTrainer requires CUDA; keep the run going in fp32.
            logger.warning("SOLVER.AMP.ENABLED is set but CUDA is unavailable: training in fp32.")
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.AMP.ENABLED = False
            cfg.freeze()
        super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer made a plain DetectionCheckpointer just before calling us;
        # swap it before the checkpoint hook captures it.
        old = self.checkpointer
        self.checkpointer = RandWireCheckpointer(old.model, old.save_dir, **old.checkpointables)
        return super().build_hooks()

    @classmethod
    def build_optimizer(cls, cfg, model):
        from .solver import build_optimizer

        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        if is_classification(cfg):
            from .data.classification import build_classification_train_loader

            return build_classification_train_loader(cfg)
        return super().build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if is_classification(cfg):
            from .data.classification import build_classification_test_loader

            return build_classification_test_loader(cfg, dataset_name)
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if is_classification(cfg) or evaluator_type == "classification":
            from .evaluation import ClassificationEvaluator

            return ClassificationEvaluator(dataset_name, distributed=True, output_dir=output_folder)
        if evaluator_type in ("coco", None):
            return COCOEvaluator(
                dataset_name, output_dir=output_folder, use_fast_impl=fast_coco_eval_available()
            )
        raise ValueError(
            f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}): "
            "supported are 'coco' and 'classification'."
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and results:
            write_results(cfg.OUTPUT_DIR, results)
        return results


def write_results(output_dir: str, results) -> str:
    """Print the final metric table and keep it as JSON in OUTPUT_DIR."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RESULTS_FILE)
    flat = _to_builtin(results)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(flat, f, indent=2)
    os.replace(tmp, path)
    for dataset, tasks in (flat.items() if _is_nested(flat) else [("", flat)]):
        for task, metrics in tasks.items():
            keys = list(metrics)
            logger.info(
                f"{dataset} {task}:\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys)
                + "\n| " + " | ".join(f"{metrics[k]:.2f}" for k in keys) + " |"
            )
    logger.info(f"Metrics written to {path}")
    return path


def _is_nested(results) -> bool:
    return all(isinstance(v, dict) and all(isinstance(t, dict) for t in v.values()) for v in results.values())


def _to_builtin(obj):
    if isinstance(obj, (dict, OrderedDict)):
        return {str(k): _to_builtin(v) for k, v in obj.items()}
    return float(obj)


def setup_cfg(config_file: str, opts=()):
    """cfg = detectron2 defaults + MODEL.RANDWIRE + file + command-line opts."""
    cfg = get_cfg()
    add_randwire_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--config-file {config_file!r} does not exist.")
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def check_run_settings(cfg, resume: bool = False) -> None:
    """Refuse settings that would fail deep inside torch or train a broken model."""
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"cfg.MODEL.DEVICE = {device!r} but no CUDA device is available: add MODEL.DEVICE cpu.")
    weights = cfg.MODEL.WEIGHTS
    resuming = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if weights and "://" not in weights and not os.path.isfile(weights) and not resuming:
        raise ValueError(
            f"cfg.MODEL.WEIGHTS = {weights!r}: no such file. Pretrain with configs/imagenet/*.yaml and convert "
            "with tools/convert_pretrained.py (see configs/randwire_frcnn.yaml), or pass MODEL.WEIGHTS \"\" "
            "to train from scratch."
        )
    rw = cfg.MODEL.RANDWIRE
    if not weights and rw.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.NAME.startswith("build_randwire"):
        raise ValueError(
            "cfg.MODEL.RANDWIRE.NORM = 'FrozenBN' with no MODEL.WEIGHTS freezes randomly initialised "
            "statistics: to train from scratch use NORM BN, SyncBN or GN and MODEL.BACKBONE.FREEZE_AT 0."
        )


def setup(args):
    cfg = setup_cfg(args.config_file, args.opts)
    check_run_settings(cfg, resume=args.resume)
    if is_classification(cfg):
        from .solver import resolve_schedule

        resolve_schedule(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
