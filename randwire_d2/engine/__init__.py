"""The run lifecycle, between the command-line tools and the model: setup (args -> cfg,
logging), checks before launch, the OUTPUT_DIR lock, launch, the trainers and their hooks,
one-line errors and the final metrics. The model side (graphs, modeling, config,
checkpoint, data, evaluation) never imports this package.

    defaults       setup_cfg / setup: args -> cfg, derived settings, logging
    run_settings   checks of the run's settings (values, device, weights, norms)
    preflight      check_before_launch: everything the launching process checks
    output_dir     OutputDirLock, check_existing_results (no silent overwrite)
    launch         launch: N processes per machine, GPUs or CPU (gloo)
    trainer        Trainer (yaml configs) and its build_* methods
    hooks          ExactResumeHook
    datasets       detection training dicts, builtin-dataset hints
    results        write_results: OUTPUT_DIR/final_metrics.json
    errors         TrainingError, WorkerError, one-line messages
    train_net, lazyconfig_train_net (+ lazy_config): what tools/train_net.py and
                   tools/lazyconfig_train_net.py run
"""
from ..config import CLASSIFIER, is_classification
from .datasets import builtin_dataset_hint, detection_train_dicts, load_detection_train_dicts
from .defaults import DERIVED, derive_settings, setup, setup_cfg, setup_logging
from .errors import TrainingError, WorkerError, debug_enabled, hide_console_tracebacks, log_failure, one_line
from .hooks import ExactResumeHook
from .launch import launch, shutdown_process_group, uses_cuda
from .output_dir import OutputDirLock, RunLockError, check_existing_results
from .preflight import check_before_launch, check_output_dir_writable
from .results import RESULTS_FILE, write_results
from .run_settings import amp_needs_cuda, check_run_settings, check_run_values
from .trainer import Trainer, ddp_for_cpu_models, fast_coco_eval_available, model_num_classes

__all__ = [
    "CLASSIFIER",
    "DERIVED",
    "ExactResumeHook",
    "OutputDirLock",
    "RESULTS_FILE",
    "RunLockError",
    "Trainer",
    "TrainingError",
    "WorkerError",
    "amp_needs_cuda",
    "builtin_dataset_hint",
    "check_before_launch",
    "check_existing_results",
    "check_output_dir_writable",
    "check_run_settings",
    "check_run_values",
    "ddp_for_cpu_models",
    "debug_enabled",
    "derive_settings",
    "detection_train_dicts",
    "fast_coco_eval_available",
    "hide_console_tracebacks",
    "is_classification",
    "launch",
    "load_detection_train_dicts",
    "log_failure",
    "model_num_classes",
    "one_line",
    "setup",
    "setup_cfg",
    "setup_logging",
    "shutdown_process_group",
    "uses_cuda",
    "write_results",
]
