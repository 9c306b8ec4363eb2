"""Network-generator studies (``tools/sweep.py``): the paper's protocol of reporting a
generator by the mean ± std of several seeds, as one command.

A sweep = one base config x generators x seeds. Every (generator, seed) is one
``tools/train_net.py`` training in ``<sweep>/runs/<generator>/seed<S>/``; the sweep
collects each run's ``final_metrics.json``, params and FLOPs (fvcore, the trained
graphs), graph hashes and wall time into ``sweep.json`` / ``sweep.md`` and figures.

    plan = SweepPlan.create(config_file, opts, ["WS(4,0.75)", "ER(0.2)"], ["0-4"], "output/sweeps/x")
    sweep = run_sweep(plan, LaunchOptions(parallel=2))
"""
from .controller import SWEEP_JSON, SWEEP_MD, LaunchOptions, collect, cpu_threads, run_states, run_sweep, task_for
from .plan import SWEEP_CONFIG, Generator, Run, SweepPlan, is_generator_text, parse_generator, parse_seeds
from .report import flatten_metrics, format_tables
from .runner import LOG_FILE, STATUS_FILE

__all__ = [
    "LOG_FILE", "STATUS_FILE", "SWEEP_CONFIG", "SWEEP_JSON", "SWEEP_MD", "Generator", "LaunchOptions", "Run",
    "SweepPlan", "collect", "cpu_threads", "flatten_metrics", "format_tables", "is_generator_text",
    "parse_generator", "parse_seeds", "run_states", "run_sweep", "task_for",
]
