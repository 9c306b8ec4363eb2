"""TorchScript and ONNX export of RandWire detectors, by tracing through detectron2's
``TracingAdapter`` (as detectron2's ``tools/deploy/export_model.py --export-method tracing``).

The exported graph takes one image tensor ``(3, H, W)`` float32, in ``cfg.INPUT.FORMAT``
channel order and already resized like :class:`~detectron2.engine.DefaultPredictor` does
(shortest edge ``INPUT.MIN_SIZE_TEST``, longest at most ``INPUT.MAX_SIZE_TEST``); it
normalises, pads and runs the whole detector, returning boxes (in the resized image's
coordinates), classes, scores and the image size. ``export_info.json`` beside the model
records the preprocessing, the output names and the class names, which
:class:`ExportedDetector` uses to run an exported file like the eager model.

The stages run with the plain ``"reference"`` executor while tracing: nothing but standard
torch ops end up in the graph.
"""
import importlib
import json
import logging
import os
import sys
import types
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
INFO_FILE = "export_info.json"
EXPORT_EXECUTOR = "reference"
# Names of the flattened outputs of a GeneralizedRCNN's Instances, by field.
_FIELD_NAMES = {"pred_boxes": "boxes", "pred_classes": "classes", "scores": "scores"}
DEFAULT_ONNX_OPSET = 17
MIN_ONNX_OPSET = 16  # RoiAlign's half_pixel mode (detectron2's aligned ROIAlign)


class ExportError(ValueError):
    """Bad export input: the message names the file, key or value."""


def tracing_adapter_class():
    """detectron2's TracingAdapter. v0.6's ``detectron2/export/__init__.py`` imports caffe2
    (gone from torch) before anything else; its ``flatten`` module does not need it."""
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ImportError as exc:
        if "caffe2" not in str(exc):
            raise
    import detectron2

    pkg_dir = os.path.join(os.path.dirname(detectron2.__file__), "export")
    stub = types.ModuleType("detectron2.export")
    stub.__path__ = [pkg_dir]
    previous = sys.modules.get("detectron2.export")
    sys.modules["detectron2.export"] = stub
    try:
        flatten = importlib.import_module("detectron2.export.flatten")
    finally:  # leave no half-imported package behind
        if previous is None:
            sys.modules.pop("detectron2.export", None)
        else:
            sys.modules["detectron2.export"] = previous
    return flatten.TracingAdapter


def use_reference_executor(model: torch.nn.Module) -> torch.nn.Module:
    from .modeling.stage import set_executor

    return set_executor(model, EXPORT_EXECUTOR)


def build_inference_model(cfg):
    """The detector of ``cfg`` with ``cfg.MODEL.WEIGHTS`` loaded, in eval mode, reference executor."""
    from detectron2.modeling import build_model

    from .checkpoint import RandWireCheckpointer

    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        raise ExportError(
            f"cfg.MODEL.META_ARCHITECTURE = {cfg.MODEL.META_ARCHITECTURE!r}: export supports the "
            "'GeneralizedRCNN' detectors (Faster R-CNN FPN) of randwire_d2."
        )
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ExportError("cfg.MODEL.WEIGHTS is empty: pass the trained model, e.g. MODEL.WEIGHTS output/model_final.pth.")
    if "://" not in weights and not os.path.isfile(weights):
        raise ExportError(f"cfg.MODEL.WEIGHTS = {weights!r}: no such file.")
    model = build_model(cfg)
    RandWireCheckpointer(model).load(weights)
    model.eval()
    return use_reference_executor(model)


def preprocess(cfg, image: np.ndarray) -> Dict:
    """``image`` (H, W, 3) uint8 in cfg.INPUT.FORMAT -> the model's input dict, resized as
    DefaultPredictor does."""
    import detectron2.data.transforms as T

    height, width = image.shape[:2]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    resized = aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))
    return {"image": tensor, "height": height, "width": width}


def read_image(cfg, path: str) -> np.ndarray:
    from detectron2.data.detection_utils import read_image as d2_read_image

    if not os.path.isfile(path):
        raise ExportError(f"sample image {path!r}: no such file.")
    try:
        return d2_read_image(path, format=cfg.INPUT.FORMAT)
    except Exception as exc:
        raise ExportError(f"sample image {path!r} cannot be read: {type(exc).__name__}: {exc}") from None


def _inference_no_postprocess(model, inputs):
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def traceable(model, sample: Dict):
    """TracingAdapter of ``model`` taking the image tensor of ``sample`` alone."""
    adapter_cls = tracing_adapter_class()
    # eval(): torch.onnx.export restores the wrapper's mode afterwards, and a new module is
    # in training mode, which would leave the detector in training mode too
    return adapter_cls(model, [{"image": sample["image"]}], _inference_no_postprocess).eval()


def _output_names(model, adapter, image: torch.Tensor) -> List[str]:
    """Flat output names in the adapter's order: detectron2 flattens Instances as its
    fields sorted by name, then the image size."""
    with torch.no_grad():
        flat = adapter(image)
        fields = sorted(_inference_no_postprocess(model, [{"image": image}])[0]["instances"].get_fields())
    names = [_FIELD_NAMES.get(f, f) for f in fields] + ["image_size"]
    if len(names) != len(flat):  # a detectron2 whose flattening differs: fail loudly, not silently
        raise ExportError(f"unexpected traced outputs: {len(flat)} tensors for fields {fields}.")
    return names


def export(cfg, model, sample: Dict, fmt: str, output_dir: str, opset: int = DEFAULT_ONNX_OPSET) -> str:
    """Trace ``model`` on ``sample`` and write ``output_dir/model.{ts,onnx}`` + export_info.json."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: allowed are {list(FORMATS)}.")
    if fmt == "onnx" and opset < MIN_ONNX_OPSET:
        raise ExportError(
            f"--opset {opset}: the box pooler's ROIAlign(aligned=True) needs ONNX opset >= {MIN_ONNX_OPSET} "
            "(RoiAlign's half_pixel mode); older opsets would shift every pooled box."
        )
    os.makedirs(output_dir, exist_ok=True)
    use_reference_executor(model)
    adapter = traceable(model, sample)
    image = sample["image"]
    path = os.path.join(output_dir, MODEL_FILES[fmt])
    names = _output_names(model, adapter, image)
    with torch.no_grad(), warnings.catch_warnings():
        # detectron2 traces shape arithmetic on purpose; the legacy ONNX exporter is the one
        # that takes a traced graph
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        if fmt == "torchscript":
            ts = torch.jit.trace(adapter, (image,), check_trace=False)
            torch.jit.save(ts, path)
        else:
            dynamic = {"image": {1: "height", 2: "width"}}
            dynamic.update({n: {0: "detections"} for n in names if n != "image_size"})
            torch.onnx.export(
                adapter, (image,), path, dynamo=False, opset_version=opset,
                input_names=["image"], output_names=names, dynamic_axes=dynamic,
            )
    info = {
        "format": fmt,
        "model_file": MODEL_FILES[fmt],
        "input": {
            "name": "image", "layout": "CHW float32", "format": cfg.INPUT.FORMAT,
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST, "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        },
        "outputs": names,
        "boxes": "XYXY in the resized input image's pixels",
        "num_classes": int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
        "thing_classes": _class_names(cfg),
        "score_thresh_test": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
    }
    with open(os.path.join(output_dir, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    logger.info(f"Exported {fmt} to {path} (outputs {names})")
    return path


def _class_names(cfg) -> Optional[List[str]]:
    from detectron2.data import MetadataCatalog

    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            return list(classes)
    return None


class ExportedDetector:
    """Runs an exported model like the eager detector: ``[{"image", "height", "width"}]`` ->
    ``[{"instances": Instances}]`` with boxes scaled to the original image size."""

    def __init__(self, output_dir: str):
        info_path = os.path.join(output_dir, INFO_FILE)
        if not os.path.isfile(info_path):
            raise ExportError(f"{info_path!r}: no such file (is {output_dir!r} an export_model.py output?).")
        with open(info_path) as f:
            self.info = json.load(f)
        path = os.path.join(output_dir, self.info["model_file"])
        if not os.path.isfile(path):
            raise ExportError(f"exported model {path!r}: no such file.")
        self.format = self.info["format"]
        if self.format == "torchscript":
            self._ts = torch.jit.load(path, map_location="cpu")
        else:
            try:
                import onnxruntime
            except ImportError:
                raise ExportError("running an ONNX export needs onnxruntime: pip install onnxruntime") from None

            self._session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def raw(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Flat outputs of one preprocessed image, by name."""
        image = image.to(torch.float32)  # detectron2's test loader gives uint8
        if self.format == "torchscript":
            with torch.no_grad():
                outs = self._ts(image)
            outs = [o for o in outs]
        else:
            outs = self._session.run(None, {"image": image.numpy()})
            outs = [torch.from_numpy(np.asarray(o)) for o in outs]
        return dict(zip(self.info["outputs"], outs))

    def __call__(self, inputs: Sequence[Dict]) -> List[Dict]:
        from detectron2.modeling.postprocessing import detector_postprocess
        from detectron2.structures import Boxes, Instances

        results = []
        for inp in inputs:
            out = self.raw(inp["image"])
            h, w = (int(v) for v in out["image_size"])
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(out["boxes"])
            inst.scores = out["scores"]
            inst.pred_classes = out["classes"].long()
            height = inp.get("height", h)
            width = inp.get("width", w)
            results.append({"instances": detector_postprocess(inst, height, width)})
        return results


BOX_ATOL = 1e-2  # pixels of the original image
SCORE_ATOL = 1e-4


def compare(model, exported, samples: Sequence[Dict], box_atol: float = BOX_ATOL, score_atol: float = SCORE_ATOL) -> Dict:
    """Eager ``model`` vs ``exported`` on ``samples``: same detections (count, classes) and
    boxes/scores within tolerance. Returns the largest differences and ``match``."""
    stats = {"images": 0, "detections": 0, "max_box_diff": 0.0, "max_score_diff": 0.0, "match": True, "problems": []}
    for i, sample in enumerate(samples):
        with torch.no_grad():
            ref = model([sample])[0]["instances"].to("cpu")
        got = exported([sample])[0]["instances"]
        stats["images"] += 1
        if len(ref) != len(got):
            stats["match"] = False
            stats["problems"].append(f"image {i}: {len(got)} detections exported, {len(ref)} eager")
            continue
        stats["detections"] += len(ref)
        if not len(ref):
            continue
        box = float((ref.pred_boxes.tensor - got.pred_boxes.tensor).abs().max())
        score = float((ref.scores - got.scores).abs().max())
        stats["max_box_diff"] = max(stats["max_box_diff"], box)
        stats["max_score_diff"] = max(stats["max_score_diff"], score)
        if not torch.equal(ref.pred_classes, got.pred_classes) or box > box_atol or score > score_atol:
            stats["match"] = False
            stats["problems"].append(f"image {i}: classes equal {torch.equal(ref.pred_classes, got.pred_classes)}, "
                                     f"box diff {box:.3g}, score diff {score:.3g}")
    return stats
