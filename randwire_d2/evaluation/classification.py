"""Top-1 / top-5 accuracy as a detectron2 ``DatasetEvaluator``."""
import copy
import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List

import numpy as np
import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["ClassificationEvaluator", "topk_correct"]

logger = logging.getLogger(__name__)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[int, torch.Tensor]:
    """Per-sample bool tensors: is the label among the top-k scores (k capped at #classes)?"""
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels, device=scores.device).view(-1)
    if scores.dim() != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be (N, K) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}.")
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hits = top == labels[:, None]
    return {k: hits[:, : min(k, kmax)].any(dim=1) for k in ks}


class ClassificationEvaluator(DatasetEvaluator):
    """Top-1 and top-5 accuracy (percent) of ``{"scores": (K,)}`` outputs against the
    inputs' ``"label"``.

    Only a few integers per image are kept (label, top-5 class indices), so gathering
    ImageNet-val to the main process costs ~1 MB. Under distributed evaluation every
    process evaluates its own shard (detectron2's InferenceSampler); ``evaluate``
    gathers all shards on the main process, which returns the results, and the other
    processes return ``{}`` as detectron2's evaluators do. ``image_id`` deduplicates
    when present.

    Returns ``OrderedDict({"classification": {"top1", "top5", "num_images"}})``. If
    ``output_dir`` is given, writes ``classification_predictions.pth`` (per image: id,
    label, top-5) and ``classification_metrics.json`` there.
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: str = None, *, topk: int = 5):
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._topk = int(topk)
        self._cpu = torch.device("cpu")
        self.reset()

    def reset(self):
        self._predictions: List[Dict] = []

    def process(self, inputs, outputs):
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs.")
        if not outputs:
            return
        for inp in inputs:
            if "label" not in inp:
                raise KeyError(f"ClassificationEvaluator needs a 'label' in every input (dataset {self._dataset_name!r}).")
        scores = torch.stack([o["scores"] for o in outputs]).to(self._cpu, torch.float32)
        k = min(self._topk, scores.shape[1])
        top = scores.topk(k, dim=1).indices.numpy()
        for i, inp in enumerate(inputs):
            self._predictions.append(
                {"image_id": inp.get("image_id", None), "label": int(inp["label"]), "topk": top[i].astype(np.int32)}
            )

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._predictions, dst=0)
            if not comm.is_main_process():
                return {}
            predictions = list(itertools.chain(*gathered))
        else:
            predictions = self._predictions
        if not predictions:
            logger.warning(f"[ClassificationEvaluator] no predictions for {self._dataset_name!r}.")
            return {}
        ids = [p["image_id"] for p in predictions]
        if None not in ids:
            unique = {}
            for p in predictions:
                unique.setdefault(p["image_id"], p)
            if len(unique) != len(predictions):
                logger.warning(f"{len(predictions) - len(unique)} duplicate predictions dropped.")
            predictions = list(unique.values())
        labels = np.array([p["label"] for p in predictions])
        top = np.stack([p["topk"] for p in predictions])
        hits = top == labels[:, None]
        top1 = 100.0 * hits[:, :1].any(axis=1).mean()
        top5 = 100.0 * hits[:, :5].any(axis=1).mean()
        metrics = {"top1": float(top1), "top5": float(top5), "num_images": len(predictions)}
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            with PathManager.open(os.path.join(self._output_dir, "classification_predictions.pth"), "wb") as f:
                torch.save(predictions, f)
            with PathManager.open(os.path.join(self._output_dir, "classification_metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
        logger.info(
            f"{self._dataset_name}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% "
            f"on {metrics['num_images']} images"
        )
        return OrderedDict({"classification": copy.deepcopy(metrics)})
