"""The run's final metrics: printed as a table and kept as strict JSON in
``OUTPUT_DIR/final_metrics.json`` (the file sweeps and reports read)."""
import json
import logging
import math
import os
from collections import OrderedDict

__all__ = ["RESULTS_FILE", "write_results"]

logger = logging.getLogger("randwire_d2")
RESULTS_FILE = "final_metrics.json"


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
