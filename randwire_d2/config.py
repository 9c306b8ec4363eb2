"""MODEL.RANDWIRE.* config keys and their validation.

Models take explicit arguments; this module is the thin layer that maps a
detectron2 cfg onto them and names the offending key when a value is wrong
(and, for yaml files, names a ``_BASE_`` that does not resolve).
"""
import json
import os
from typing import Dict

from detectron2.config import CfgNode as CN

from .graphs import GENERATORS, GraphSpec, specs_from_dict, validate_generator_params
from .modeling.network import COMPILE_MODES, FEATURES, REGIMES, build_graph_specs
from .modeling.stage import EXECUTORS

NORMS = ("BN", "SyncBN", "naiveSyncBN", "FrozenBN", "GN")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# generator -> {parameter: MODEL.RANDWIRE key}
GENERATOR_KEYS = {"WS": {"k": "WS_K", "p": "WS_P"}, "ER": {"p": "ER_P"}, "BA": {"m": "BA_M"}}
CLASSIFIER = "RandWireClassifier"  # the classification meta-architecture


def is_classification(cfg: CN) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == CLASSIFIER


def add_randwire_config(cfg: CN) -> CN:
    """Add MODEL.RANDWIRE and the classification keys to ``cfg`` (idempotent)."""
    _C = cfg
    _C.MODEL.RANDWIRE = CN()
    rw = _C.MODEL.RANDWIRE
    rw.REGIME = "regular"  # "small" (C=78) or "regular" (C=109, 154)
    rw.CHANNELS = 109  # C
    rw.NODES = 32  # N; the regular regime's conv2 has N/2
    rw.GENERATOR = "WS"  # "WS", "ER" or "BA"
    rw.WS_K = 4
    rw.WS_P = 0.75
    rw.ER_P = 0.2
    rw.BA_M = 5
    rw.SEED = 0  # network seed; each stage derives its own
    # JSON file of graph specs (or a checkpoint carrying them) to rebuild a model
    # exactly, whatever networkx version is installed. Overrides GENERATOR/SEED.
    rw.GRAPHS_FILE = ""
    rw.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    rw.NORM = "BN"
    rw.DROP_PATH = 0.0
    # "auto": lean on CUDA, the reference on CPU (faster there); or "lean" / "reference" (the
    # paper's spec) everywhere: randwire_d2/modeling/stage.py, lean.py
    rw.EXECUTOR = "auto"
    # lean only: keep just node outputs for backward (least memory, ~18% more bytes moved)
    rw.RECOMPUTE = False
    # torch.compile the RandWire network (the backbone, not the whole detector)
    rw.COMPILE = False
    # its torch.compile mode: "default", "reduce-overhead" (CUDA graphs: the step's kernel
    # launches replayed as one; fixed input sizes, e.g. the ImageNet step) or "max-autotune"
    rw.COMPILE_MODE = "default"
    # "channels_last" runs the RandWire network and its input in NHWC end to end (cuDNN's fast
    # depthwise and BN kernels), "contiguous" in NCHW; "auto": channels_last on CUDA only
    rw.MEMORY_FORMAT = "auto"
    # Loading a checkpoint (MODEL.WEIGHTS, --resume) with a tensor whose shape does not fit
    # the model (another width or preset) is refused, naming it. True: load only the
    # tensors that fit, skipping the others with a warning (detectron2's behaviour).
    rw.PARTIAL_WEIGHTS = False
    # Classification (pretraining) head
    rw.NUM_CLASSES = 1000
    rw.HEAD_CHANNELS = 1280
    rw.DROPOUT = 0.2
    rw.LABEL_SMOOTHING = 0.1
    # "SGD" (the paper's, with SOLVER.MOMENTUM/NESTEROV) or "AdamW" (SOLVER.BETAS)
    if "OPTIMIZER" not in _C.SOLVER:
        _C.SOLVER.OPTIMIZER = "SGD"
    if "BETAS" not in _C.SOLVER:
        _C.SOLVER.BETAS = (0.9, 0.999)
    # training precision (randwire_d2/engine/precision.py): "fp32", "bf16" (autocast, no scaler),
    # "fp16" (autocast + GradScaler) or "auto": bf16 on CUDA where supported, else fp16 if
    # SOLVER.AMP.ENABLED, else fp32; fp32 on CPU
    if "PRECISION" not in _C.SOLVER.AMP:
        _C.SOLVER.AMP.PRECISION = "auto"
    add_dataset_config(cfg)
    return add_classification_config(cfg)


def add_dataset_config(cfg: CN) -> CN:
    """Your own detection datasets, registered by name (randwire_d2/data/custom.py); idempotent:
      DATASETS.COCO_JSON  [[name, json_file, image_root], ...]
      DATASETS.VOC        [[name, dirname, split, [class names]], ...]  (Pascal VOC layout)
    """
    if "COCO_JSON" not in cfg.DATASETS:
        cfg.DATASETS.COCO_JSON = []
    if "VOC" not in cfg.DATASETS:
        cfg.DATASETS.VOC = []
    return cfg


# the paper's networks have N = 32 nodes per stage; far larger graphs are a typo more
# often than an experiment (N = 5000: a 1.45 GB checkpoint, minutes per image on a CPU)
PAPER_MAX_NODES = 64
MAX_NODES = 512
GN_GROUPS = 32  # detectron2's get_norm("GN", C) is GroupNorm(32, C)


def resolve_channels_last(memory_format: str, device) -> bool:
    """MODEL.RANDWIRE.MEMORY_FORMAT -> whether the RandWire network runs in channels_last."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(
            f"cfg.MODEL.RANDWIRE.MEMORY_FORMAT = {memory_format!r} is invalid: allowed are {list(MEMORY_FORMATS)}."
        )
    if memory_format == "auto":  # cuDNN's fast depthwise and BN kernels are NHWC ones
        return str(device).startswith("cuda")
    return memory_format == "channels_last"


def _check(cond: bool, key: str, value, allowed: str):
    if not cond:
        raise ValueError(f"cfg.MODEL.RANDWIRE.{key} = {value!r} is invalid: {allowed}.")


def generator_params(rw: CN) -> Dict[str, float]:
    gen = str(rw.GENERATOR).upper()
    _check(gen in GENERATORS, "GENERATOR", rw.GENERATOR, f"allowed are {list(GENERATORS)}")
    keys = GENERATOR_KEYS[gen]
    params = {name: rw.get(key) for name, key in keys.items()}
    try:
        return validate_generator_params(gen, int(rw.NODES), params)
    except ValueError as exc:
        names = ", ".join(f"MODEL.RANDWIRE.{k}" for k in keys.values())
        raise ValueError(f"Bad random-graph settings ({names}): {exc}") from None


def load_graph_specs(path: str) -> Dict[str, GraphSpec]:
    """Specs from a JSON file ({stage: spec}) or from a checkpoint that carries them."""
    if not os.path.isfile(path):
        raise ValueError(f"cfg.MODEL.RANDWIRE.GRAPHS_FILE: no such file {path!r}.")
    if not path.endswith(".json"):
        from .checkpoint import read_graph_specs

        return read_graph_specs(path)
    try:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict):
            data = data.get("randwire_graphs", data)
        return specs_from_dict(data)
    except ValueError as exc:  # JSONDecodeError is a ValueError too
        raise ValueError(
            f"cfg.MODEL.RANDWIRE.GRAPHS_FILE {path!r} is not a JSON object of graph specs "
            f"({{stage: {{num_nodes, edges, ...}}}}): {exc}"
        ) from None


def randwire_kwargs(cfg: CN) -> dict:
    """Validated RandWireNet arguments from cfg.MODEL.RANDWIRE (names the bad key)."""
    rw = cfg.MODEL.RANDWIRE
    _check(rw.REGIME in REGIMES, "REGIME", rw.REGIME, f"allowed are {list(REGIMES)}")
    _check(isinstance(rw.CHANNELS, int) and rw.CHANNELS >= 2, "CHANNELS", rw.CHANNELS, "an integer >= 2")
    min_nodes = 4 if rw.REGIME == "regular" else 2  # regular conv2 has N/2 nodes
    _check(isinstance(rw.NODES, int) and min_nodes <= rw.NODES <= MAX_NODES, "NODES", rw.NODES,
           f"an integer in [{min_nodes}, {MAX_NODES}] for the {rw.REGIME} regime (the paper uses 32)")
    _check(isinstance(rw.SEED, int) and rw.SEED >= 0, "SEED", rw.SEED, "a non-negative integer")
    _check(rw.NORM in NORMS, "NORM", rw.NORM, f"allowed are {list(NORMS)}")
    _check(isinstance(rw.DROP_PATH, (int, float)) and 0.0 <= rw.DROP_PATH < 1.0, "DROP_PATH",
           rw.DROP_PATH, "a rate in [0, 1)")
    _check(isinstance(rw.DROPOUT, (int, float)) and 0.0 <= rw.DROPOUT < 1.0, "DROPOUT", rw.DROPOUT,
           "a rate in [0, 1)")
    _check(rw.EXECUTOR in EXECUTORS, "EXECUTOR", rw.EXECUTOR, f"allowed are {list(EXECUTORS)}"
           + (" ('fused' and 'batched' were removed: 'lean' keeps and moves fewer bytes)"
              if rw.EXECUTOR in ("fused", "batched") else ""))
    _check(isinstance(rw.RECOMPUTE, bool), "RECOMPUTE", rw.RECOMPUTE, "true or false")
    _check(not rw.RECOMPUTE or rw.EXECUTOR != "reference", "RECOMPUTE", rw.RECOMPUTE,
           f"recompute needs MODEL.RANDWIRE.EXECUTOR 'lean' or 'auto', not {rw.EXECUTOR!r}")
    _check(isinstance(rw.COMPILE, bool), "COMPILE", rw.COMPILE, "true or false")
    _check(rw.COMPILE_MODE in COMPILE_MODES, "COMPILE_MODE", rw.COMPILE_MODE, f"allowed are {list(COMPILE_MODES)}")
    _check(isinstance(rw.OUT_FEATURES, (list, tuple)), "OUT_FEATURES", rw.OUT_FEATURES,
           f"a list from {list(FEATURES[:-1])}")
    feats = list(rw.OUT_FEATURES)
    _check(bool(feats) and all(f in FEATURES[:-1] for f in feats), "OUT_FEATURES", feats,
           f"a non-empty list from {list(FEATURES[:-1])}")
    _check(len(set(feats)) == len(feats), "OUT_FEATURES", feats, "a list without duplicates")
    if rw.NORM == "GN":
        _check_gn_widths(rw)
    if rw.GRAPHS_FILE:
        graphs = load_graph_specs(rw.GRAPHS_FILE)
    else:
        graphs = build_graph_specs(rw.REGIME, rw.NODES, rw.GENERATOR, generator_params(rw), rw.SEED)
    return dict(
        regime=rw.REGIME,
        channels=rw.CHANNELS,
        graphs=graphs,
        norm=rw.NORM,
        drop_path=float(rw.DROP_PATH),
        out_features=feats,
        executor=rw.EXECUTOR,
        recompute=rw.RECOMPUTE,
        compile=rw.COMPILE,
        compile_mode=rw.COMPILE_MODE,
        channels_last=resolve_channels_last(rw.MEMORY_FORMAT, cfg.MODEL.DEVICE),
    )


def _check_gn_widths(rw: CN) -> None:
    from .modeling.network import STAGES, stage_layout

    layout = stage_layout(rw.REGIME, rw.CHANNELS, 32)
    widths = {"stem (C/2)": rw.CHANNELS // 2, **{n: layout[n]["channels"] for n in STAGES}}
    bad = {name: w for name, w in widths.items() if w % GN_GROUPS}
    if bad:
        raise ValueError(
            f"cfg.MODEL.RANDWIRE.NORM = 'GN' ({GN_GROUPS} groups) needs every width divisible by {GN_GROUPS}, but "
            f"MODEL.RANDWIRE.CHANNELS = {rw.CHANNELS} ({rw.REGIME} regime) gives widths {widths}: use CHANNELS a "
            f"multiple of {2 * GN_GROUPS}, or NORM BN / SyncBN / naiveSyncBN."
        )


def model_warnings(cfg: CN):
    """Settings that are allowed but probably not meant (one message each)."""
    rw = cfg.MODEL.RANDWIRE
    if isinstance(rw.NODES, int) and rw.NODES > PAPER_MAX_NODES:
        yield (
            f"cfg.MODEL.RANDWIRE.NODES = {rw.NODES} is far above the paper's N = 32: every stage gets {rw.NODES} "
            "nodes (parameters, memory and time grow with it)."
        )


def check_detection_head_widths(cfg: CN) -> None:
    """GroupNorm widths of the FPN and box head (detectron2 would fail deep in torch)."""
    fpn_norm = cfg.MODEL.FPN.NORM
    out = cfg.MODEL.FPN.OUT_CHANNELS
    if not (isinstance(out, int) and out > 0):
        raise ValueError(f"cfg.MODEL.FPN.OUT_CHANNELS = {out!r} is invalid: a positive integer.")
    if fpn_norm == "GN" and out % GN_GROUPS:
        raise ValueError(
            f"cfg.MODEL.FPN.OUT_CHANNELS = {out} with MODEL.FPN.NORM 'GN' ({GN_GROUPS} groups): needs a multiple of "
            f"{GN_GROUPS} (e.g. {max(GN_GROUPS, out // GN_GROUPS * GN_GROUPS)}), or another MODEL.FPN.NORM."
        )
    head = cfg.MODEL.ROI_BOX_HEAD
    if head.NORM == "GN" and head.NUM_CONV > 0 and head.CONV_DIM % GN_GROUPS:
        raise ValueError(
            f"cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = {head.CONV_DIM} with MODEL.ROI_BOX_HEAD.NORM 'GN' ({GN_GROUPS} "
            f"groups): needs a multiple of {GN_GROUPS}, or another MODEL.ROI_BOX_HEAD.NORM."
        )


def add_classification_config(cfg: CN) -> CN:
    """Keys of the classification (ImageNet pretraining) path; idempotent.

    Schedules in epochs (resolved into iterations by ``randwire_d2.solver.resolve_schedule``;
    all are no-ops at their defaults, so detection configs are unaffected):
      SOLVER.EPOCHS             > 0: MAX_ITER = ceil(EPOCHS * num_train_images / IMS_PER_BATCH)
      SOLVER.WARMUP_EPOCHS      > 0 (with EPOCHS): WARMUP_ITERS from epochs
      SOLVER.LR_PER_256         > 0: BASE_LR = LR_PER_256 * IMS_PER_BATCH / 256 (linear scaling)
      SOLVER.CHECKPOINT_EPOCHS  > 0 (with EPOCHS): CHECKPOINT_PERIOD from epochs
      TEST.EVAL_EPOCHS          > 0 (with EPOCHS): TEST.EVAL_PERIOD from epochs
    Data:
      DATASETS.IMAGENET_ROOT    folder with train/ and val/ (else env RANDWIRE_IMAGENET_ROOT)
      INPUT.CROP_SIZE           train crop / eval center crop (224)
      INPUT.RESIZE_SIZE         eval shorter-side resize before the center crop (256)
      INPUT.CLS_TRAIN_AUG       "random_resized_crop" (ImageNet) or "pad_crop" (small images)
      INPUT.CLS_CROP_SCALE      area range of the random resized crop
      INPUT.CLS_PAD             zero padding of "pad_crop"
      INPUT.CLS_DECODE          where images are decoded and augmented: "auto" (batched on the GPU
                                when MODEL.DEVICE is CUDA, else "cpu"), "cpu" (PIL in the loader
                                workers) or "device" (batched on MODEL.DEVICE; randwire_d2.data.device_decode)
      TEST.IMS_PER_BATCH        evaluation images per process and batch
      DATALOADER.CLS_PREFETCH_FACTOR  batches prefetched per loader worker
    The flip follows detectron2's INPUT.RANDOM_FLIP ("horizontal" / "vertical" / "none").
    """
    def setdefault(node: CN, key: str, value):
        if key not in node:
            node[key] = value

    setdefault(cfg.SOLVER, "EPOCHS", 0.0)
    setdefault(cfg.SOLVER, "WARMUP_EPOCHS", 0.0)
    setdefault(cfg.SOLVER, "LR_PER_256", 0.0)
    setdefault(cfg.SOLVER, "CHECKPOINT_EPOCHS", 0.0)
    setdefault(cfg.TEST, "EVAL_EPOCHS", 0.0)
    setdefault(cfg.TEST, "IMS_PER_BATCH", 32)
    setdefault(cfg.DATASETS, "IMAGENET_ROOT", "")
    setdefault(cfg.INPUT, "CROP_SIZE", 224)
    setdefault(cfg.INPUT, "RESIZE_SIZE", 256)
    setdefault(cfg.INPUT, "CLS_TRAIN_AUG", "random_resized_crop")
    setdefault(cfg.INPUT, "CLS_CROP_SCALE", (0.08, 1.0))
    setdefault(cfg.INPUT, "CLS_PAD", 4)
    setdefault(cfg.INPUT, "CLS_DECODE", "auto")
    setdefault(cfg.DATALOADER, "CLS_PREFETCH_FACTOR", 4)
    return cfg


def check_config_bases(config_file: str) -> None:
    """Every ``_BASE_`` of a yaml config (and of its bases) exists; a relative one is resolved
    against the folder of the file naming it, as detectron2 does, and the error names both."""
    import yaml

    seen, todo = set(), [config_file]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            with open(path) as f:
                base = (yaml.safe_load(f) or {}).get("_BASE_")
        except (OSError, yaml.YAMLError, AttributeError):
            return  # merge_from_file reports it
        if not isinstance(base, str):
            continue
        resolved = os.path.expanduser(base)
        if not resolved.startswith(("/", "https://", "http://")):
            resolved = os.path.join(os.path.dirname(path), resolved)
        if os.path.isfile(resolved):
            todo.append(resolved)
            continue
        import randwire_d2

        shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(randwire_d2.__file__))), "configs")
        candidates = [os.path.join(root, os.path.basename(base)) for root, _, files in os.walk(shipped)
                      if os.path.basename(base) in files]
        hint = f": set it to {candidates[0]!r}" if candidates else ""
        raise FileNotFoundError(
            f"{path!r}: _BASE_ {base!r} resolves to {os.path.normpath(os.path.abspath(resolved))!r}, which does "
            f"not exist (a relative _BASE_ is relative to the folder of the file that names it){hint}."
        )
