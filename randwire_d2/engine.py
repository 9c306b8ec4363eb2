"""Training/evaluation glue shared by tools/train_net.py: one Trainer for detection
and classification, picking loaders, evaluators and optimizer by meta-architecture.

Reliability (see :class:`Trainer`):

* **Exact resume.** Training batches come from :class:`ResumableTrainLoader`: global batch
  ``i`` (its images *and* their random augmentation) is a pure function of
  ``(seed, i)``, whatever the number of processes or loader workers, so a run resumed
  with ``--resume`` at iteration ``i`` sees exactly the data an uninterrupted run would
  have seen. :class:`ExactResumeHook` reseeds the model's RNGs (dropout, drop-path, RPN/ROI
  sampling) from ``(seed, iteration, rank)`` at every step and carries the data seed and
  the recent metric history (for smoothed logged values) in the checkpoint.
* **Distributed on CPU.** DDP of a CPU model (gloo) with detectron2 v0.6, whose
  ``create_ddp_model`` always passes a GPU ``device_ids`` (see also ``randwire_d2.launch``).
* **Hostile input.** Training dicts pass :func:`randwire_d2.data.validation.sanitize_detection_dicts`
  and images are read by :class:`~randwire_d2.data.validation.SafeDatasetMapper`
  (errors name the file).
"""
import contextlib
import json
import logging
import math
import os
import random
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, HookBase, default_setup
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .checkpoint import RandWireCheckpointer
from .config import add_classification_config, add_randwire_config
from .data.resumable import _TAG_STEP, ResumableTrainLoader, derive_seed, training_seed
from .data.custom import (
    check_dataset_classes,
    check_dataset_files,
    check_detection_datasets,
    register_custom_datasets,
)
from .data.validation import DataError, SafeDatasetMapper, sanitize_detection_dicts
from .errors import TrainingError, hide_console_tracebacks, one_line
from .precision import PrecisionTrainer, resolve_precision
from .run_settings import check_run_values

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


def _detection_num_classes(cfg) -> Optional[int]:
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "ProposalNetwork":
        return None
    if arch == "RetinaNet":
        return int(cfg.MODEL.RETINANET.NUM_CLASSES)
    return int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)



def builtin_dataset_hint(exc: BaseException) -> str:
    """For a file missing under detectron2's builtin-dataset root: where that root comes from."""
    missing = getattr(exc, "filename", None)
    env = os.environ.get("DETECTRON2_DATASETS")
    root = os.path.abspath(os.path.expanduser(env or "datasets"))
    if not missing or not os.path.abspath(str(missing)).startswith(root + os.sep):
        return ""
    now = f"DETECTRON2_DATASETS={env!r}" if env else "DETECTRON2_DATASETS is unset, so ./datasets"
    return (
        f" detectron2 reads its builtin datasets (coco_2017_*, lvis_*, voc_*, ...) from $DETECTRON2_DATASETS "
        f"({now}) in its layout (coco/annotations/instances_val2017.json, coco/val2017/, ...): "
        "export DETECTRON2_DATASETS=/path/to/datasets before starting."
    )

def load_detection_train_dicts(cfg) -> List[Dict]:
    """detectron2's training dicts (same filtering as its loader), then our checks."""
    return detection_train_dicts(
        cfg.DATASETS.TRAIN,
        num_classes=_detection_num_classes(cfg),
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )


def detection_train_dicts(
    names, *, num_classes: Optional[int], filter_empty: bool = True, min_keypoints: int = 0, proposal_files=None
) -> List[Dict]:
    """:func:`load_detection_train_dicts` with explicit arguments (LazyConfig data configs)."""
    from detectron2.data import get_detection_dataset_dicts

    names = [names] if isinstance(names, str) else list(names)
    try:
        dicts = get_detection_dataset_dicts(
            names, filter_empty=filter_empty, min_keypoints=min_keypoints, proposal_files=proposal_files
        )
    except DataError:
        raise
    except Exception as exc:  # e.g. load_coco_json's KeyError on an unknown category id
        files = [MetadataCatalog.get(n).get("json_file", None) for n in names if n in DatasetCatalog.list()]
        files = [f for f in files if f]
        raise DataError(
            f"Cannot load training dataset(s) {names}"
            + (f" (annotation file(s) {files})" if files else "")
            + f": {type(exc).__name__}: {exc}"
            + builtin_dataset_hint(exc)
        ) from exc
    dicts, _ = sanitize_detection_dicts(
        dicts,
        num_classes if num_classes is not None else 2**31,
        filter_empty=filter_empty,
        dataset_names=names,
    )
    if not dicts:
        raise DataError(f"No usable training images left in {names}.")
    return dicts


@contextlib.contextmanager
def _ddp_for_cpu_models():
    """detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which DDP
    refuses for a CPU model; give CPU models ``device_ids=None`` instead."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        param = next(model.parameters(), None)
        if comm.get_world_size() > 1 and param is not None and param.device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


class ExactResumeHook(HookBase):
    """Makes a resumed run continue exactly like an uninterrupted one.

    * before every step, seeds python/numpy/torch RNGs from ``(seed, iteration, rank)``:
      the model's randomness (dropout, drop-path, RPN/ROI sampling) no longer depends on
      how many iterations this process has run;
    * its ``state_dict`` (saved inside the trainer's, i.e. in every checkpoint) carries
      the data seed and the last ``KEEP`` values of each logged scalar, restored into the
      EventStorage on resume so smoothed metrics (window medians) match too.
    """

    KEEP = 200

    def __init__(self, loader=None, seed: Optional[int] = None):
        self._loader = loader
        self._seed = seed
        self._pending_history = None

    @property
    def seed(self) -> Optional[int]:
        return self._loader.seed if self._loader is not None else self._seed

    def state_dict(self):
        state = {"data_seed": self.seed}
        storage = getattr(self.trainer, "storage", None)
        if storage is not None:
            state["history"] = {
                name: [(float(v), int(it)) for v, it in buf.values()[-self.KEEP:]]
                for name, buf in storage.histories().items()
            }
        return state

    def load_state_dict(self, state):
        seed = state.get("data_seed")
        if seed is not None:
            if self._loader is not None:
                self._loader.seed = int(seed)
            else:
                self._seed = int(seed)
        self._pending_history = state.get("history")

    def before_train(self):
        if self._pending_history:
            histories = self.trainer.storage.histories()
            start = self.trainer.start_iter
            for name, entries in self._pending_history.items():
                for value, iteration in entries:
                    if iteration < start:
                        histories[name].update(value, iteration)
        self._pending_history = None

    def before_step(self):
        if self.seed is not None:
            step_seed = derive_seed(self.seed, _TAG_STEP, self.trainer.iter, comm.get_rank())
            random.seed(step_seed)
            np.random.seed(step_seed)
            torch.manual_seed(step_seed)


class Trainer(DefaultTrainer):
    """DefaultTrainer with RandWire checkpoints (graph specs, atomic writes, spec checks),
    the classification data path, weight decay kept off norms and aggregation weights,
    exactly resumable data and RNG streams, CPU DDP, and checked input data."""

    def __init__(self, cfg):
        if _amp_needs_cuda(cfg):  # setup() already did this (and said so) for train_net runs
            logger.warning("SOLVER.AMP.ENABLED is set but the model is not on CUDA: SOLVER.AMP.PRECISION "
                           "decides ('auto': fp32 on CPU).")
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.AMP.ENABLED = False
            cfg.freeze()
        with _ddp_for_cpu_models():
            super().__init__(cfg)
        # detectron2 picked SimpleTrainer or its fp16-only AMPTrainer: train in SOLVER.AMP.PRECISION
        precision = resolve_precision(cfg)
        old = self._trainer
        self._trainer = PrecisionTrainer(old.model, old.data_loader, old.optimizer, precision, cfg.MODEL.DEVICE)
        logger.info(f"Training precision: {precision} (SOLVER.AMP.PRECISION {cfg.SOLVER.AMP.PRECISION!r}).")

    def train(self):
        """detectron2's training loop; an exception becomes a one-line :class:`TrainingError`
        naming the iteration and the last good checkpoint (detectron2 has logged the
        traceback to the log file; checkpoints are written atomically, so the last one
        is intact)."""
        try:
            return super().train()
        except Exception as exc:
            raise TrainingError(
                f"training stopped at iteration {self.iter}: {one_line(exc)} ({self._last_good_checkpoint()})",
                self.iter,
            ) from exc

    def _last_good_checkpoint(self) -> str:
        if self.checkpointer.has_checkpoint():
            return f"last good checkpoint: {self.checkpointer.get_checkpoint_file()}"
        return "no checkpoint was written"

    def build_hooks(self):
        # DefaultTrainer made a plain DetectionCheckpointer just before calling us;
        # swap it before the checkpoint hook captures it.
        old = self.checkpointer
        self.checkpointer = RandWireCheckpointer(
            old.model, old.save_dir, partial_weights=self.cfg.MODEL.RANDWIRE.PARTIAL_WEIGHTS, **old.checkpointables
        )
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            hook = ExactResumeHook(loader=loader)
        else:
            hook = ExactResumeHook(seed=self.cfg.SEED if self.cfg.SEED >= 0 else None)
        return [hook] + super().build_hooks()

    # detectron2 v0.6's DefaultTrainer does not checkpoint its SimpleTrainer: the optimizer
    # (momentum buffers, and the param groups' current LR) was lost on resume. HEAD saves
    # it under "_trainer"; do the same on v0.6, in the same place.
    _D2_SAVES_TRAINER = "load_state_dict" in DefaultTrainer.__dict__

    def state_dict(self):
        ret = super().state_dict()
        if "_trainer" not in ret:  # HEAD already saved it
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        if "_trainer" not in state_dict:
            # HEAD's DefaultTrainer would raise KeyError here: load iteration and hooks only
            TrainerBase.load_state_dict(self, state_dict)
            logger.warning("The checkpoint has no optimizer state (saved by detectron2 v0.6?): momentum restarts.")
            return
        from .solver import describe_optimizer_mismatch

        problem = describe_optimizer_mismatch(self.optimizer, state_dict["_trainer"].get("optimizer"), self.cfg)
        if problem:
            raise ValueError(
                f"Cannot resume from the checkpoint in {self.cfg.OUTPUT_DIR!r}: {problem}. Resume with the "
                "checkpoint's settings, or start a new run from its weights (MODEL.WEIGHTS <checkpoint>, "
                "another OUTPUT_DIR, no --resume)."
            )
        super().load_state_dict(state_dict)
        if not self._D2_SAVES_TRAINER:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.start_iter = self.start_iter
            if self.start_iter:
                logger.info(f"Training data resumes at global batch {self.start_iter} (seed {loader.seed}).")

    @classmethod
    def build_optimizer(cls, cfg, model):
        from .solver import build_optimizer

        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        resumable = cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
        if is_classification(cfg):
            from .data.classification import build_classification_train_loader, check_classification_datasets

            check_classification_datasets(cfg)
            if not resumable:
                logger.warning(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN} is not used for classification.")
            return build_classification_train_loader(cfg)
        check_dataset_files(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        check_dataset_classes(cfg, cfg.DATASETS.TRAIN)
        dicts = load_detection_train_dicts(cfg)
        mapper = SafeDatasetMapper(cfg, True)
        if not resumable:
            from detectron2.data import build_detection_train_loader

            logger.warning(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN}: resuming is not exact.")
            return build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
        return ResumableTrainLoader(
            dicts,
            mapper,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            seed=training_seed(cfg),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if is_classification(cfg):
            from .data.classification import build_classification_test_loader

            return build_classification_test_loader(cfg, dataset_name)
        from detectron2.data import build_detection_test_loader

        try:
            return build_detection_test_loader(cfg, dataset_name, mapper=SafeDatasetMapper(cfg, False))
        except FileNotFoundError as exc:
            hint = builtin_dataset_hint(exc)
            if hint:
                raise FileNotFoundError(f"Dataset {dataset_name!r}: {exc}.{hint}") from exc
            raise

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
        if evaluator_type == "pascal_voc":
            from detectron2.evaluation import PascalVOCDetectionEvaluator

            return PascalVOCDetectionEvaluator(dataset_name)
        raise ValueError(
            f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}): "
            "supported are 'coco', 'pascal_voc' and 'classification'."
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        if not is_classification(cfg):  # before any inference: a wrong class count evaluates to AP 0
            check_dataset_files(cfg.DATASETS.TEST, "DATASETS.TEST")
            check_dataset_classes(cfg, cfg.DATASETS.TEST, model_num_classes(model))
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
    with open(tmp, "w") as f:  # strict JSON: NaN (e.g. AP of a class absent from val) -> null
        f.write(json.dumps(flat, indent=2, allow_nan=False))
    os.replace(tmp, path)
    for dataset, tasks in (flat.items() if _is_nested(flat) else [("", flat)]):
        for task, metrics in tasks.items():
            keys = list(metrics)
            logger.info(
                f"{dataset} {task}:\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys)
                + "\n| " + " | ".join("nan" if metrics[k] is None else f"{metrics[k]:.2f}" for k in keys) + " |"
            )
    logger.info(f"Metrics written to {path}")
    return path


def _is_nested(results) -> bool:
    return all(isinstance(v, dict) and all(isinstance(t, dict) for t in v.values()) for v in results.values())


def _to_builtin(obj):
    if isinstance(obj, (dict, OrderedDict)):
        return {str(k): _to_builtin(v) for k, v in obj.items()}
    value = float(obj)
    return value if math.isfinite(value) else None


def setup_cfg(config_file: str, opts=()):
    """cfg = detectron2 defaults + MODEL.RANDWIRE + file + command-line opts."""
    cfg = get_cfg()
    add_randwire_config(cfg)
    add_classification_config(cfg)
    if config_file is None:  # the defaults only
        return cfg
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--config-file {config_file!r} does not exist.")
        cfg.merge_from_file(config_file)
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"Command-line config options must be KEY VALUE pairs; got an odd number: {opts}")
    try:
        cfg.merge_from_list(opts)
    except AssertionError as exc:  # yacs reports a command-line typo as an assertion
        if str(exc).startswith("Non-existent key: "):
            raise KeyError(f"Non-existent config key: {str(exc)[len('Non-existent key: '):]} (command line)") from None
        raise
    register_custom_datasets(cfg)  # DATASETS.COCO_JSON / VOC: here, so in every process
    return cfg


def model_num_classes(model) -> Optional[int]:
    """The class count a built detector predicts (None if it has no such head)."""
    model = getattr(model, "module", model)  # DDP
    for head in ("roi_heads", "head"):
        n = getattr(getattr(model, head, None), "num_classes", None)
        if n is not None:
            return int(n)
    return getattr(model, "num_classes", None)


def check_run_settings(cfg, resume: bool = False, world_size: Optional[int] = None) -> None:
    """Refuse settings that would fail deep inside torch or train a broken model.
    ``world_size``: the number of processes (default: the current process group's)."""
    device = str(cfg.MODEL.DEVICE)
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"cfg.MODEL.DEVICE = {device!r} is invalid: 'cpu', 'cuda' or 'cuda:N'.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"cfg.MODEL.DEVICE = {device!r} but no CUDA device is available: add MODEL.DEVICE cpu.")
    world = comm.get_world_size() if world_size is None else world_size
    check_run_values(cfg, world_size=world, classification=is_classification(cfg))
    resolve_precision(cfg)  # names SOLVER.AMP.PRECISION if it is wrong
    weights = cfg.MODEL.WEIGHTS
    resuming = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if weights and "://" not in weights and not os.path.isfile(weights) and not resuming:
        raise ValueError(
            f"cfg.MODEL.WEIGHTS = {weights!r}: no such file. Pretrain with configs/imagenet/*.yaml and convert "
            "with tools/convert_pretrained.py (see configs/randwire_frcnn.yaml), or pass MODEL.WEIGHTS \"\" "
            "to train from scratch."
        )
    rw = cfg.MODEL.RANDWIRE
    if world > 1 and not device.startswith("cuda"):
        norms = {
            "MODEL.RANDWIRE.NORM": rw.NORM,
            "MODEL.FPN.NORM": cfg.MODEL.FPN.NORM,
            "MODEL.RESNETS.NORM": cfg.MODEL.RESNETS.NORM,
            "MODEL.ROI_BOX_HEAD.NORM": cfg.MODEL.ROI_BOX_HEAD.NORM,
        }
        for key, norm in norms.items():
            if norm == "SyncBN":
                raise ValueError(
                    f"cfg.{key} = 'SyncBN' needs CUDA (torch's SyncBatchNorm runs on GPUs only) but this "
                    f"{world}-process run is on {device!r}: use 'naiveSyncBN' (detectron2's all-reduce "
                    "BN, works with gloo on CPU), 'GN' or 'BN'."
                )
    if not weights and rw.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.NAME.startswith("build_randwire"):
        raise ValueError(
            "cfg.MODEL.RANDWIRE.NORM = 'FrozenBN' with no MODEL.WEIGHTS freezes randomly initialised "
            "statistics: to train from scratch use NORM BN, SyncBN or GN and MODEL.BACKBONE.FREEZE_AT 0."
        )


def _amp_needs_cuda(cfg) -> bool:
    # detectron2's AMPTrainer requires CUDA
    return bool(cfg.SOLVER.AMP.ENABLED) and not (torch.cuda.is_available() and str(cfg.MODEL.DEVICE).startswith("cuda"))


# settings the code may replace, and what replaces them
DERIVED = {
    "SOLVER.BASE_LR": "SOLVER.LR_PER_256 x IMS_PER_BATCH / 256",
    "SOLVER.MAX_ITER": "SOLVER.EPOCHS",
    "SOLVER.WARMUP_ITERS": "SOLVER.WARMUP_EPOCHS",
    "SOLVER.CHECKPOINT_PERIOD": "SOLVER.CHECKPOINT_EPOCHS",
    "TEST.EVAL_PERIOD": "TEST.EVAL_EPOCHS",
    "SOLVER.AMP.ENABLED": "no CUDA device: SOLVER.AMP.PRECISION 'auto' trains in fp32 on CPU",
}


def _get_key(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def derive_settings(cfg) -> List[str]:
    """Resolve the settings computed from others (epoch schedules, LR scaling, AMP off
    without CUDA) in a defrosted ``cfg``; return one message per setting that changed."""
    before = {key: _get_key(cfg, key) for key in DERIVED}
    if is_classification(cfg):
        from .solver import resolve_schedule

        resolve_schedule(cfg)
    if _amp_needs_cuda(cfg):
        cfg.SOLVER.AMP.ENABLED = False
    defaults = setup_cfg(None)
    messages = []
    for key, why in DERIVED.items():
        old, new = before[key], _get_key(cfg, key)
        if old != new:
            given = "" if old == _get_key(defaults, key) else " (set in the config/command line)"
            messages.append(f"{key} = {old!r}{given} is replaced by {new!r}: {why}")
    return messages


def setup_logging(cfg) -> None:
    """randwire_d2's own logger to the console and OUTPUT_DIR/log.txt like detectron2's;
    tracebacks only to the log file (unless RANDWIRE_DEBUG=1)."""
    from detectron2.utils.logger import setup_logger

    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="randwire_d2", abbrev_name="rw")
    logging.getLogger("randwire_d2").propagate = True  # and to the root's handlers, if any (pytest's caplog)
    hide_console_tracebacks()


def setup(args):
    cfg = setup_cfg(args.config_file, args.opts)
    check_run_settings(cfg, resume=args.resume)
    if not is_classification(cfg):
        check_detection_datasets(cfg, eval_only=args.eval_only)
    changes = derive_settings(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logging(cfg)
    for message in changes:  # now that logging is set up
        logger.warning(message)
    return cfg
