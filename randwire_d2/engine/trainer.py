"""The yaml path's trainer: one :class:`Trainer` for detection and classification,
picking loaders, evaluators and optimizer by meta-architecture.

Reliability (see :class:`Trainer`):

* **Exact resume.** Training batches come from :class:`ResumableTrainLoader`: global batch
  ``i`` (its images *and* their random augmentation) is a pure function of
  ``(seed, i)``, whatever the number of processes or loader workers, so a run resumed
  with ``--resume`` at iteration ``i`` sees exactly the data an uninterrupted run would
  have seen. :class:`~randwire_d2.engine.hooks.ExactResumeHook` reseeds the model's RNGs
  (dropout, drop-path, RPN/ROI sampling) from ``(seed, iteration, rank)`` at every step and
  carries the data seed and the recent metric history (for smoothed logged values) in the
  checkpoint.
* **Distributed on CPU.** DDP of a CPU model (gloo) with detectron2 v0.6, whose
  ``create_ddp_model`` always passes a GPU ``device_ids`` (see also ``randwire_d2.engine.launch``).
* **Hostile input.** Training dicts pass :func:`randwire_d2.data.validation.sanitize_detection_dicts`
  and images are read by :class:`~randwire_d2.data.validation.SafeDatasetMapper`
  (errors name the file).
"""
import contextlib
import logging
import os
from typing import Optional

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from ..checkpoint import RandWireCheckpointer
from ..config import is_classification
from ..data.custom import check_dataset_classes, check_dataset_files
from ..data.resumable import ResumableTrainLoader, training_seed
from ..data.validation import SafeDatasetMapper
from .datasets import builtin_dataset_hint, load_detection_train_dicts
from .errors import TrainingError, one_line
from .hooks import ExactResumeHook
from .preemption import StopHook
from .provenance import evaluated_weights, train_class_names
from .results import write_results
from .precision import PrecisionTrainer, resolve_precision
from .run_settings import amp_needs_cuda

__all__ = ["Trainer", "ddp_for_cpu_models", "fast_coco_eval_available", "model_num_classes"]

logger = logging.getLogger("randwire_d2")


def fast_coco_eval_available() -> bool:
    """detectron2's fast COCO eval needs its C++ extension (absent in the registry build)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def model_num_classes(model) -> Optional[int]:
    """The class count a built detector predicts (None if it has no such head)."""
    model = getattr(model, "module", model)  # DDP
    for head in ("roi_heads", "head"):
        n = getattr(getattr(model, head, None), "num_classes", None)
        if n is not None:
            return int(n)
    return getattr(model, "num_classes", None)


@contextlib.contextmanager
def ddp_for_cpu_models():
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


class Trainer(DefaultTrainer):
    """DefaultTrainer with RandWire checkpoints (graph specs, atomic writes, spec checks),
    the classification data path, weight decay kept off norms and aggregation weights,
    exactly resumable data and RNG streams, CPU DDP, and checked input data."""

    def __init__(self, cfg):
        if amp_needs_cuda(cfg):  # setup() already did this (and said so) for train_net runs
            logger.warning("SOLVER.AMP.ENABLED is set but the model is not on CUDA: SOLVER.AMP.PRECISION "
                           "decides ('auto': fp32 on CPU).")
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.AMP.ENABLED = False
            cfg.freeze()
        with ddp_for_cpu_models():
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
            if self.iter >= self.max_iter:  # the loop finished: the final evaluation failed
                raise TrainingError(
                    f"the evaluation after training failed: {one_line(exc)} (training finished: "
                    f"{self._last_good_checkpoint()})",
                    self.iter,
                ) from exc
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
            old.model, old.save_dir, partial_weights=self.cfg.MODEL.RANDWIRE.PARTIAL_WEIGHTS,
            class_names=train_class_names(self.cfg), **old.checkpointables
        )
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            hook = ExactResumeHook(loader=loader)
        else:
            hook = ExactResumeHook(seed=self.cfg.SEED if self.cfg.SEED >= 0 else None)
        # StopHook last: a stop signal checkpoints the iteration after its evaluation and logging
        return [hook] + super().build_hooks() + [StopHook(self.checkpointer)]

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
        from ..solver import describe_optimizer_mismatch

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
        from ..solver import build_optimizer

        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        resumable = cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
        if is_classification(cfg):
            from ..data.classification import build_classification_train_loader, check_classification_datasets

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
            from ..data.classification import build_classification_test_loader

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
            from ..evaluation import ClassificationEvaluator

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
            write_results(cfg.OUTPUT_DIR, results, weights=evaluated_weights(cfg))
        return results
