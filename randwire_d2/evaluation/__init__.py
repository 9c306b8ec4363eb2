"""Evaluators for RandWire models (detection uses detectron2's COCOEvaluator)."""
from .classification import ClassificationEvaluator, topk_correct  # noqa: F401

__all__ = ["ClassificationEvaluator", "topk_correct"]
