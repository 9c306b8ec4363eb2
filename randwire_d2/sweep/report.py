"""A sweep's results: per-run records (metrics, params, FLOPs, graph hashes, wall time),
per-generator statistics, the markdown table and the figures."""
import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence

from ..engine import RESULTS_FILE, WEIGHTS_KEY

__all__ = [
    "PRIMARY_METRICS",
    "flatten_metrics",
    "format_tables",
    "make_figures",
    "pick_metric",
    "summarize_runs",
]

# the paper's headline numbers, in order of preference
PRIMARY_METRICS = ("classification/top1", "bbox/AP", "segm/AP", "keypoints/AP")
SECONDARY = {"classification/top1": ("classification/top5",), "bbox/AP": ("bbox/AP50", "bbox/AP75"),
             "segm/AP": ("segm/AP50", "segm/AP75")}


def _value(v) -> Optional[float]:
    """A metric as float; None for NaN / null (e.g. APs of a dataset without small objects)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def flatten_metrics(results: dict) -> Dict[str, Optional[float]]:
    """final_metrics.json -> {"task/metric": value}; with several test sets
    {"dataset/task/metric": value} (detectron2 nests by dataset only then).
    NaN and null become None, so sweep.json stays strict JSON."""
    def is_task_level(d):
        return all(v is None or isinstance(v, (int, float)) for v in d.values())

    results = {k: v for k, v in results.items() if k != WEIGHTS_KEY}  # provenance, not a metric

    if all(isinstance(v, dict) and is_task_level(v) for v in results.values()):
        return {f"{task}/{k}": _value(v) for task, m in results.items() for k, v in m.items()}
    return {
        f"{dataset}/{task}/{k}": _value(v)
        for dataset, tasks in results.items() for task, m in tasks.items() for k, v in m.items()
    }


def read_metrics(output_dir: str) -> Dict[str, float]:
    with open(os.path.join(output_dir, RESULTS_FILE)) as f:
        return flatten_metrics(json.load(f))


def pick_metric(records: Sequence[dict], requested: Optional[str] = None) -> Optional[str]:
    """The metric the sweep ranks seeds by: ``requested`` or the first of PRIMARY_METRICS present."""
    keys = [k for r in records for k in r.get("metrics", {})]
    if not keys:
        return requested
    if requested:
        if requested not in keys:
            raise ValueError(f"--metric {requested!r} is not among the runs' metrics: {sorted(set(keys))}.")
        return requested
    for name in PRIMARY_METRICS:
        if name in keys:
            return name
    for name in PRIMARY_METRICS:  # several test sets: dataset/task/metric
        hits = [k for k in keys if k.endswith("/" + name)]
        if hits:
            return hits[0]
    return keys[0]


def secondary_metrics(metric: str, records: Sequence[dict]) -> List[str]:
    """The companions shown next to ``metric`` (top-5 for top-1, AP50/AP75 for AP)."""
    keys = {k for r in records for k in r.get("metrics", {})}
    for task_metric, extras in SECONDARY.items():
        if metric == task_metric or metric.endswith("/" + task_metric):
            head = metric[: len(metric) - len(task_metric)]
            return [head + e for e in extras if head + e in keys]
    return []


def _stats(values: Sequence[float]) -> dict:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize_runs(records: Sequence[dict], generators: Sequence[str]) -> Dict[str, dict]:
    """{generator label: {"n", "metrics": {key: stats}, "params", "flops", "wall_time_s"}}
    over its finished runs; std is the sample standard deviation (0 for one run)."""
    summary = {}
    for label in generators:
        done = [r for r in records if r["generator"] == label and r["status"] == "finished"]
        keys = sorted({k for r in done for k in r.get("metrics", {})})
        summary[label] = {
            "n": len(done),
            "seeds": [r["seed"] for r in done],
            "metrics": {k: _stats([r["metrics"].get(k) for r in done]) for k in keys},
            "params": _stats([r.get("params") for r in done]),
            "flops": _stats([r.get("flops") for r in done]),
            "wall_time_s": _stats([r.get("wall_time_s") for r in done]),
        }
    return summary


def _num(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(value) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3f}{unit}"
    return f"{value:.0f}"


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_tables(sweep: dict) -> str:
    """Markdown: per-generator statistics, then every run."""
    metric = sweep.get("metric")
    records, summary = sweep["runs"], sweep["summary"]
    extra = secondary_metrics(metric, records) if metric else []
    short = lambda k: k.split("/")[-1]  # noqa: E731
    header = ["generator", "n", f"{short(metric) if metric else 'metric'} mean ± std", "min", "max"]
    header += [f"{short(k)} mean ± std" for k in extra] + ["params", "FLOPs", "wall time / run"]
    rows = []
    for label, s in summary.items():
        m = s["metrics"].get(metric, {}) if metric else {}
        row = [label, str(s["n"]), f"{_num(m.get('mean'))} ± {_num(m.get('std'))}" if m.get("n") else "-",
               _num(m.get("min")), _num(m.get("max"))]
        for k in extra:
            e = s["metrics"].get(k, {})
            row.append(f"{_num(e.get('mean'))} ± {_num(e.get('std'))}" if e.get("n") else "-")
        row += [_count(s["params"]["mean"]), _count(s["flops"]["mean"]),
                f"{_num(s['wall_time_s']['mean'], 0)} s" if s["wall_time_s"]["n"] else "-"]
        rows.append(row)
    out = [_md_table(header, rows)]
    header = ["generator", "seed", "status"] + [short(k) for k in ([metric] if metric else []) + extra]
    header += ["params", "FLOPs", "wall time", "graph hashes"]
    rows = []
    for r in records:
        metrics = r.get("metrics", {})
        row = [r["generator"], str(r["seed"]), r["status"]]
        row += [_num(metrics.get(k)) for k in ([metric] if metric else []) + extra]
        hashes = " ".join(f"{s}:{h[:8]}" for s, h in sorted(r.get("graphs", {}).items()))
        row += [_count(r.get("params")), _count(r.get("flops")),
                f"{_num(r.get('wall_time_s'), 0)} s" if r.get("wall_time_s") else "-", hashes or "-"]
        rows.append(row)
    out.append(_md_table(header, rows))
    return "\n\n".join(out)


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _done(records, label, metric):
    return [r for r in records if r["generator"] == label and r["status"] == "finished"
            and r.get("metrics", {}).get(metric) is not None]


def plot_metric_by_generator(sweep: dict, path: str) -> str:
    """Every seed as a point, the mean ± std as a bar, per generator."""
    from matplotlib.figure import Figure

    metric, records, labels = sweep["metric"], sweep["runs"], list(sweep["summary"])
    fig = Figure(figsize=(max(4.0, 1.6 * len(labels) + 1.5), 4.0))
    ax = fig.subplots()
    for i, (label, color) in enumerate(zip(labels, _colors(len(labels)))):
        runs = _done(records, label, metric)
        if not runs:
            continue
        offsets = [0.18 * ((j + 0.5) / len(runs) - 0.5) for j in range(len(runs))]
        ax.scatter([i - 0.12 + o for o in offsets], [r["metrics"][metric] for r in runs], s=28, color=color,
                   alpha=0.85, zorder=3, label=None)
        for o, r in zip(offsets, runs):
            ax.annotate(str(r["seed"]), (i - 0.12 + o, r["metrics"][metric]), textcoords="offset points",
                        xytext=(-5, 0), fontsize=6, color="#555555", va="center", ha="right")
        s = sweep["summary"][label]["metrics"][metric]
        ax.errorbar([i + 0.14], [s["mean"]], yerr=[s["std"]], fmt="D", color="black", ms=5, capsize=5, zorder=4)
        ax.annotate(f"{s['mean']:.2f} ± {s['std']:.2f}\n(n={s['n']})", (i + 0.14, s["mean"]),
                    textcoords="offset points", xytext=(8, 0), fontsize=7, va="center")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.6, len(labels) - 0.1)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per network generator\npoints: seeds (labelled), diamond: mean ± std", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return path


def plot_metric_vs_flops(sweep: dict, path: str) -> str:
    from matplotlib.figure import Figure

    metric, records, labels = sweep["metric"], sweep["runs"], list(sweep["summary"])
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()
    top = max((r.get("flops") or 0 for r in records), default=0)
    unit, scale = next(((u, s) for u, s in (("G", 1e9), ("M", 1e6)) if top >= s), ("K", 1e3))
    for label, color in zip(labels, _colors(len(labels))):
        runs = [r for r in _done(records, label, metric) if r.get("flops")]
        if not runs:
            continue
        xs = [r["flops"] / scale for r in runs]
        ys = [r["metrics"][metric] for r in runs]
        ax.scatter(xs, ys, s=24, color=color, alpha=0.6, label=f"{label} (seeds)")
        if len(runs) > 1:
            ax.errorbar([statistics.mean(xs)], [statistics.mean(ys)], xerr=[statistics.stdev(xs)],
                        yerr=[statistics.stdev(ys)], fmt="D", color=color, mec="black", ms=6, capsize=4,
                        label=f"{label} mean ± std")
    ax.set_xlabel(f"FLOPs ({unit} multiply-adds; {sweep.get('flops_note', 'fvcore')})")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs FLOPs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return path


def best_and_worst(sweep: dict, label: str) -> List[tuple]:
    """[("best", record), ("worst", record)] of a generator by the sweep's metric
    (one entry when it has one run)."""
    runs = sorted(_done(sweep["runs"], label, sweep["metric"]), key=lambda r: (-r["metrics"][sweep["metric"]], r["seed"]))
    if not runs:
        return []
    return [("best", runs[0])] + ([("worst", runs[-1])] if len(runs) > 1 else [])


def make_figures(sweep: dict, fig_dir: str) -> List[str]:
    """The sweep's PNGs; returns their paths."""
    from ..checkpoint import read_graph_specs
    from ..visualization import draw_graph_specs

    if not sweep.get("metric") or not any(s["n"] for s in sweep["summary"].values()):
        return []
    os.makedirs(fig_dir, exist_ok=True)
    stem = sweep["metric"].replace("/", "_")
    paths = [
        plot_metric_by_generator(sweep, os.path.join(fig_dir, f"{stem}_per_generator.png")),
        plot_metric_vs_flops(sweep, os.path.join(fig_dir, f"{stem}_vs_flops.png")),
    ]
    for label in sweep["summary"]:
        ranked = best_and_worst(sweep, label)
        for which, r in ranked:
            ckpt = os.path.join(r["output_dir"], "model_final.pth")
            if not os.path.isfile(ckpt):
                continue
            value = r["metrics"][sweep["metric"]]
            title = (f"{label}, seed {r['seed']}: {which} of {len(_done(sweep['runs'], label, sweep['metric']))} "
                     f"seeds ({sweep['metric']} {value:.2f})")
            out = os.path.join(fig_dir, "graphs", f"{r['generator_slug']}_{which}_seed{r['seed']}.png")
            paths += draw_graph_specs(read_graph_specs(ckpt), out, title=title)
    return paths
