#!/usr/bin/env python
"""Network-generator study: train every (generator, seed) of a config, report mean ± std.

One tools/train_net.py training per (generator, seed), each in its own OUTPUT_DIR
under --output-dir, then sweep.json, sweep.md (also printed) and figures/:

    python tools/sweep.py --config-file configs/imagenet/randwire_ws_small_c78.yaml \\
        --generators "WS(4,0.75)" "ER(0.2)" "BA(5)" --seeds 0-4 --num-gpus 8 \\
        --output-dir output/sweeps/small_c78 SOLVER.EPOCHS 100
    # the same on a SLURM cluster: one array job, a task per run
    python tools/sweep.py ... --launcher slurm --partition gpu --time 4320 --gpus-per-node 8

Rerunning the same command skips finished runs; interrupted or failed runs continue
from their last checkpoint with --resume. A sweep directory refuses a command whose
config (file + KEY VALUE opts) differs from the one it was made with.
MODEL.RANDWIRE.SEED and SEED are set to each seed (--fixed-training-seed keeps the
config's SEED, so only the graphs vary).
"""
import argparse
import os
import re
import signal
import sys
import warnings

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="base config of every run")
    parser.add_argument("--generators", nargs="+", required=True, metavar="GEN",
                        help="e.g. 'WS(4,0.75)' 'ER(0.2)' 'BA(5)' ('WS' alone: the config's parameters)")
    parser.add_argument("--seeds", nargs="+", default=["0-4"], metavar="S",
                        help="seeds and ranges: 0-4, 0,3,7 (default 0-4)")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="sweep directory (default output/sweeps/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted and failed runs from their last checkpoint")
    parser.add_argument("--collect-only", action="store_true", help="train nothing: collect and report")
    parser.add_argument("--metric", help="metric ranking seeds (default classification/top1, else bbox/AP)")
    parser.add_argument("--fixed-training-seed", action="store_true",
                        help="keep the config's SEED for every run (only the network seed varies)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) per training")
    parser.add_argument("--parallel", type=int, default=1, help="local: trainings at a time")
    slurm = parser.add_argument_group("--launcher slurm (submitit; one array job, one task per run)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--time", type=int, default=60 * 24, metavar="MIN", help="time limit per run, minutes")
    slurm.add_argument("--gpus-per-node", type=int, help="GPUs per run (default --num-gpus)")
    slurm.add_argument("--cpus-per-task", type=int, default=10, help="CPUs per run")
    slurm.add_argument("--mem-gb", type=float, help="memory per run")
    slurm.add_argument("--array-parallelism", type=int, default=256, help="runs at a time on the cluster")
    slurm.add_argument("--account", help="SLURM account")
    slurm.add_argument("--qos", help="SLURM QOS")
    slurm.add_argument("--constraint", help="SLURM constraint, e.g. volta32gb")
    slurm.add_argument("--no-wait", action="store_true", help="submit and return (rerun later to collect)")
    slurm.add_argument("--submitit-cluster", choices=("slurm", "local", "debug"), default="slurm",
                       help=argparse.SUPPRESS)  # "local"/"debug": the slurm path on this machine (tests)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides for every run, KEY VALUE pairs")
    args = parser.parse_args(argv)
    from randwire_d2.sweep import is_generator_text

    # --generators / --seeds take several values: what follows the last of them are the opts
    gens, seeds = list(args.generators), list(args.seeds)
    cut = next((i for i, g in enumerate(gens) if not is_generator_text(g)), len(gens))
    cut_s = next((i for i, s in enumerate(seeds) if not re.fullmatch(r"[\d,\-\s]+", s)), len(seeds))
    args.opts = gens[cut:] + seeds[cut_s:] + list(args.opts)
    args.generators, args.seeds = gens[:cut], seeds[:cut_s]
    flags = [o for o in args.opts if str(o).startswith("--")]
    if flags:
        parser.error(f"{flags}: options go before the trailing KEY VALUE config overrides")
    if not args.seeds:
        parser.error(f"--seeds: {seeds[0]!r} is not a seed or range (e.g. 0-4, 0,3,7)")
    if not args.generators:
        parser.error(f"--generators: {gens[0]!r} is not a generator (e.g. 'WS(4,0.75)', 'ER(0.2)', 'BA(5)')")
    if args.output_dir is None:
        args.output_dir = os.path.join("output", "sweeps", os.path.splitext(os.path.basename(args.config_file))[0])
    return args


def launch_options(args):
    from randwire_d2.sweep import LaunchOptions

    slurm = {
        "timeout_min": args.time,
        "nodes": 1,
        "tasks_per_node": 1,  # train_net starts one process per GPU itself
        "gpus_per_node": args.gpus_per_node if args.gpus_per_node is not None else args.num_gpus,
        "cpus_per_task": args.cpus_per_task,
        "mem_gb": args.mem_gb,
        "slurm_partition": args.partition,
        "slurm_array_parallelism": args.array_parallelism,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
    }
    if args.submitit_cluster != "slurm":  # the local executor knows no CPU / memory / partition settings
        slurm = {k: v for k, v in slurm.items() if k in ("timeout_min", "tasks_per_node", "nodes")}
    return LaunchOptions(
        launcher=args.launcher, parallel=args.parallel, num_gpus=args.num_gpus, resume=args.resume,
        collect_only=args.collect_only, wait=not args.no_wait, cluster=args.submitit_cluster, slurm=slurm,
    )


def _stop(signum, frame):  # SIGTERM (scancel, kill): stop the trainings as Ctrl-C does
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from randwire_d2.sweep import SweepPlan, format_tables, run_sweep

    plan = SweepPlan.create(args.config_file, args.opts, args.generators, args.seeds, args.output_dir,
                            fixed_training_seed=args.fixed_training_seed)
    previous = signal.signal(signal.SIGTERM, _stop) if hasattr(signal, "SIGTERM") else None
    try:
        sweep = run_sweep(plan, launch_options(args), metric=args.metric)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(format_tables(sweep))
    for path in sweep["paths"]:
        print(f"wrote {path}")
    print(f"[sweep] {sweep['elapsed_s']:.0f} s")
    unfinished = {k: v for k, v in sweep["counts"].items() if k != "finished"}
    if unfinished:
        print("[sweep] not finished: " + ", ".join(f"{v} {k}" for k, v in sorted(unfinished.items()))
              + (" (rerun with --resume to continue the interrupted/failed ones)"
                 if not args.resume and ({"interrupted", "failed"} & set(unfinished)) else ""))
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("[sweep] stopped; running trainings were stopped and can continue with --resume.")
    except (ValueError, FileNotFoundError, KeyError) as exc:
        if os.environ.get("RANDWIRE_DEBUG"):
            raise
        sys.exit(f"error: {exc}\n(set RANDWIRE_DEBUG=1 for the traceback)")
