"""Drawings of RandWire stage graphs, laid out by topological depth like the paper's figures.

x is a node's depth (longest path from the stage input, GraphSpec.depths); nodes of
equal depth are spread vertically. The stage's input node (far left, square) feeds
the in-degree-0 nodes; the output node (far right, square) averages the
out-degree-0 nodes. Those extra edges are drawn dashed.

Used by tools/visualize_graph.py and tools/sweep.py. Figures are built with
matplotlib's object API (no pyplot), so importing this never changes the backend.
"""
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .graphs import GraphSpec

__all__ = ["COLORS", "FORMATS", "INPUT", "OUTPUT", "check_output", "draw_graph_specs", "draw_stage",
           "layout", "panel_title"]

FORMATS = (".png", ".svg", ".pdf")
INPUT, OUTPUT = "in", "out"
COLORS = {
    "node": "#dce6f2", "edge": "#4a5a70", "io_edge": "#9aa5b4",
    INPUT: "#2e8b57", OUTPUT: "#c0392b", "border_in": "#2e8b57", "border_out": "#c0392b",
}


# ----------------------------------------------------------------------------- layout
def layout(spec: GraphSpec) -> Dict[object, Tuple[float, float]]:
    """Positions of nodes 0..N-1 and of the stage's INPUT/OUTPUT nodes.

    x = depth + 1 (input node at 0, output node at max depth + 2). Within a depth
    level, nodes are ordered by the mean height of their predecessors (fewer edge
    crossings), ties by index, and centred on y = 0 with unit spacing.
    """
    depths = spec.depths
    levels: Dict[int, List[int]] = {}
    for v in spec.topological_order:
        levels.setdefault(depths[v], []).append(v)
    pos: Dict[object, Tuple[float, float]] = {INPUT: (0.0, 0.0)}
    for d in sorted(levels):
        nodes = levels[d]

        def key(v):
            preds = spec.predecessors[v]
            bary = sum(pos[u][1] for u in preds) / len(preds) if preds else 0.0
            return (bary, v)

        if d > 0:
            nodes = sorted(nodes, key=key)
        m = len(nodes)
        for i, v in enumerate(nodes):
            pos[v] = (float(d + 1), (m - 1) / 2.0 - i)
    last = max(levels) if levels else 0
    pos[OUTPUT] = (float(last + 2), 0.0)
    return pos


def panel_title(stage: str, spec: GraphSpec) -> str:
    params = ", ".join(f"{k.upper()}={v:g}" if isinstance(v, float) else f"{k.upper()}={v}"
                       for k, v in spec.param_dict.items())
    gen = f"{spec.generator}({params})" if params else spec.generator
    seed = f"seed {spec.seed}" if spec.seed >= 0 else "no seed"
    return (f"{stage}: {gen}, {seed}, {spec.num_nodes} nodes / {len(spec.edges)} edges, "
            f"hash {spec.content_hash[:12]}")


def _panel_size(spec: GraphSpec) -> Tuple[float, float]:
    depths = spec.depths
    width = max(depths) + 3 if depths else 3
    tallest = max((depths.count(d) for d in set(depths)), default=1)
    return max(7.0, 0.95 * width + 1.0), max(2.6, 0.62 * tallest + 1.3)


def draw_stage(ax, stage: str, spec: GraphSpec, *, labels: bool = True) -> None:
    pos = layout(spec)
    node_size = 260 if spec.num_nodes <= 40 else 120

    def arrow(u, v, color, style="-", rad=0.0, lw=0.9, alpha=0.85):
        ax.annotate(
            "", xy=pos[v], xytext=pos[u],
            arrowprops=dict(
                arrowstyle="-|>", color=color, lw=lw, alpha=alpha, linestyle=style,
                shrinkA=8.5, shrinkB=8.5, mutation_scale=9,
                connectionstyle=f"arc3,rad={rad}",
            ),
            zorder=1,
        )

    for v in spec.input_nodes:
        arrow(INPUT, v, COLORS["io_edge"], style="--", lw=0.8)
    for u in spec.output_nodes:
        arrow(u, OUTPUT, COLORS["io_edge"], style="--", lw=0.8)
    for u, v in spec.edges:
        (x0, y0), (x1, y1) = pos[u], pos[v]
        # Edges that skip depth levels bend a little so they do not run through nodes.
        rad = 0.0 if x1 - x0 <= 1 else (0.12 if y1 >= y0 else -0.12)
        arrow(u, v, COLORS["edge"], rad=rad)

    inputs, outputs = set(spec.input_nodes), set(spec.output_nodes)
    xs = [pos[v][0] for v in range(spec.num_nodes)]
    ys = [pos[v][1] for v in range(spec.num_nodes)]
    edgecolors = [
        COLORS["border_in"] if v in inputs else COLORS["border_out"] if v in outputs else COLORS["edge"]
        for v in range(spec.num_nodes)
    ]
    ax.scatter(xs, ys, s=node_size, c=COLORS["node"], edgecolors=edgecolors, linewidths=1.4, zorder=2)
    if labels:
        for v in range(spec.num_nodes):
            ax.text(*pos[v], str(v), ha="center", va="center", fontsize=6.5, zorder=3)
    for name in (INPUT, OUTPUT):
        ax.scatter(*pos[name], s=node_size * 1.6, marker="s", c=COLORS[name], zorder=2)
        ax.text(*pos[name], name, ha="center", va="center", fontsize=7, color="white",
                fontweight="bold", zorder=3)

    ax.set_title(panel_title(stage, spec), fontsize=9, loc="left")
    max_x = pos[OUTPUT][0]
    ax.set_xticks(range(1, int(max_x)))
    ax.set_xticklabels([str(d) for d in range(0, int(max_x) - 1)], fontsize=7)
    ax.set_xlabel("depth (longest path from the stage input)", fontsize=7)
    ax.set_xlim(-0.6, max_x + 0.6)
    ys_all = [p[1] for p in pos.values()]
    ax.set_ylim(min(ys_all) - 0.7, max(ys_all) + 0.7)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _legend(fig) -> None:
    handles = [
        Line2D([], [], marker="s", ls="", color=COLORS[INPUT], label="stage input node (stride 2, channel change)"),
        Line2D([], [], marker="s", ls="", color=COLORS[OUTPUT], label="stage output node (mean)"),
        Line2D([], [], marker="o", ls="", mfc=COLORS["node"], mec=COLORS["border_in"], label="in-degree-0 node"),
        Line2D([], [], marker="o", ls="", mfc=COLORS["node"], mec=COLORS["border_out"], label="out-degree-0 node"),
        Line2D([], [], ls="--", color=COLORS["io_edge"], label="edge to/from input/output node"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)


def check_output(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"--output must end in one of {FORMATS}, got {path!r}.")
    return ext


def draw_graph_specs(
    specs: Mapping[str, GraphSpec],
    output: str,
    *,
    per_stage: bool = False,
    stages: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    labels: bool = True,
    dpi: int = 150,
) -> List[str]:
    """Draw ``specs`` to ``output`` (one figure, a panel per stage) or, with
    ``per_stage``, one file per stage named ``<stem>_<stage><ext>``. Returns the paths."""
    ext = check_output(output)
    names = list(stages) if stages else sorted(specs)
    missing = [n for n in names if n not in specs]
    if missing:
        raise ValueError(f"No graph for stage(s) {missing}; available: {sorted(specs)}.")
    if not names:
        raise ValueError("No graph specs to draw.")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    groups = [[n] for n in names] if per_stage else [names]
    written = []
    for group in groups:
        sizes = [_panel_size(specs[n]) for n in group]
        width = max(w for w, _ in sizes)
        heights = [h for _, h in sizes]
        legend_in, title_in = 0.45, (0.4 if title else 0.0)  # inches kept free below / above
        height = sum(heights) + legend_in + title_in
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(len(group), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, name in zip(axes[:, 0], group):
            draw_stage(ax, name, specs[name], labels=labels)
        if title:
            fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
        _legend(fig)
        fig.tight_layout(rect=(0, legend_in / height, 1, 1 - title_in / height))
        if per_stage:
            stem, _ = os.path.splitext(output)
            path = f"{stem}_{group[0]}{ext}"
        else:
            path = output
        fig.savefig(path, dpi=dpi)
        written.append(path)
    return written
