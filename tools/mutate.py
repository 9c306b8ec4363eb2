#!/usr/bin/env python
"""Mutation check: break one thing the paper specifies, run the tests that should notice.

Each mutation is a text substitution in a copy of the checkout (a temp dir), so the working
tree is never touched; the pattern must occur exactly once or the mutation is reported
stale. The copy's tests run with the copy first on sys.path. Prints a table
mutation -> failing test ids, or NOT CAUGHT, and exits 1 if any mutation survives.

    python tools/mutate.py               # all mutations (~10-20 min on 2 cores)
    python tools/mutate.py --only ba_star_start sink_sum
    python tools/mutate.py --list
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import List, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("randwire_d2", "tests", "configs", "tools", "setup.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str  # relative to the repo root
    old: str
    new: str
    tests: Tuple[str, ...]


MODELING = ("tests/test_modeling.py",)
WIDTHS = ("tests/test_modeling.py", "tests/test_backbone.py", "tests/test_analysis.py")

MUTATIONS: Tuple[Mutation, ...] = (
    Mutation(
        "drop_path_at_eval", "DropPath active at eval (the stage draws every node's weights)",
        "randwire_d2/modeling/stage.py",
        "if not (nodes[0].training and rate > 0.0):", "if not rate > 0.0:", MODELING,
    ),
    Mutation(
        "drop_path_no_rescale", "DropPath without the 1/(1-rate) rescale of kept edges",
        "randwire_d2/modeling/stage.py",
        "return keep * (sig * (1.0 / (1.0 - rate)))[:, None]", "return keep * sig[:, None]", MODELING,
    ),
    Mutation(
        "head_no_leading_relu", "classifier head without its leading ReLU", "randwire_d2/modeling/network.py",
        "x = F.relu(self.conv(F.relu(x)))", "x = F.relu(self.conv(x))", MODELING,
    ),
    Mutation(
        "small_conv2_no_relu", "small-regime conv2 without its ReLU", "randwire_d2/modeling/network.py",
        "return self.conv(F.relu(x))", "return self.conv(x)", MODELING,
    ),
    Mutation(
        "regular_res2_2c", "regular regime res2 at 2C instead of C", "randwire_d2/modeling/network.py",
        '"res2": {"channels": channels, "nodes": num_nodes // 2}',
        '"res2": {"channels": 2 * channels, "nodes": num_nodes // 2}', WIDTHS,
    ),
    Mutation(
        "res5_4c", "regular regime res5 at 4C instead of 8C", "randwire_d2/modeling/network.py",
        '"res5": {"channels": 8 * channels, "nodes": num_nodes}',
        '"res5": {"channels": 4 * channels, "nodes": num_nodes}', WIDTHS,
    ),
    Mutation(
        "sink_sum", "stage output = sum of sinks, not mean (reference executor)",
        "randwire_d2/modeling/stage.py",
        "return total / len(self.output_node_set)", "return total", MODELING,
    ),
    Mutation(
        "ba_star_start", "BA from networkx 3's star start (one input node)", "randwire_d2/graphs.py",
        'nx.barabasi_albert_graph(n, params["m"], seed=seed, initial_graph=_ba_start(params["m"]))',
        'nx.barabasi_albert_graph(n, params["m"], seed=seed)', ("tests/test_graphs.py",),
    ),
    # beyond the list
    Mutation(
        "no_free", "reference executor keeps every dead output", "randwire_d2/modeling/stage.py",
        "                del live[u]\n", "                pass\n", MODELING,
    ),
    Mutation(
        "er_identity_order", "ER without the random node permutation", "randwire_d2/graphs.py",
        "return np.random.default_rng([seed, 1]).permutation(n)", "return np.arange(n)",
        ("tests/test_graphs.py",),
    ),
)


def check_pattern(mutation: Mutation, root: str = REPO) -> str:
    """The file's text; raises if the pattern is not there exactly once (stale mutation)."""
    with open(os.path.join(root, mutation.path)) as f:
        text = f.read()
    count = text.count(mutation.old)
    if count != 1:
        raise ValueError(
            f"mutation {mutation.name}: pattern {mutation.old!r} found {count} times in "
            f"{mutation.path} (expected once): update tools/mutate.py"
        )
    return text


def _copy_checkout(dest: str) -> None:
    for name in COPIED:
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), ignore=shutil.ignore_patterns("__pycache__"))
        elif os.path.exists(src):
            shutil.copy2(src, dest)


def _failed_tests(junit: str) -> List[str]:
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            module = case.get("classname", "").replace(".", "/")
            failed.append(f"{module}.py::{case.get('name')}")
    return failed


def run_tests(root: str, tests: Sequence[str], python: str) -> Tuple[int, List[str]]:
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    where = subprocess.run(
        [python, "-c", "import randwire_d2, os; print(os.path.dirname(randwire_d2.__file__))"],
        cwd=root, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]
    if os.path.realpath(where) != os.path.realpath(os.path.join(root, "randwire_d2")):
        raise RuntimeError(f"the copy is not what gets imported: randwire_d2 from {where}")
    junit = os.path.join(root, "junit.xml")
    proc = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests],
        cwd=root, env=env, capture_output=True, text=True,
    )
    if not os.path.exists(junit):
        raise RuntimeError(f"pytest produced no report:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.returncode, _failed_tests(junit)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--python", default=sys.executable, help="interpreter with the test deps")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations {sorted(unknown)}; --list shows them")
    if args.list:
        for m in mutations:
            print(f"{m.name:22s} {m.what}  [{m.path}; {' '.join(m.tests)}]")
        return 0
    for m in mutations:
        check_pattern(m)

    rows, survived = [], []
    for m in [None] + mutations:  # None: the unmutated baseline, which must pass
        with tempfile.TemporaryDirectory(prefix="randwire_mutant_") as root:
            _copy_checkout(root)
            tests = sorted({t for x in mutations for t in x.tests}) if m is None else m.tests
            if m is not None:
                text = check_pattern(m, root)
                with open(os.path.join(root, m.path), "w") as f:
                    f.write(text.replace(m.old, m.new))
            code, failed = run_tests(root, tests, args.python)
        if m is None:
            if code != 0:
                print("baseline (no mutation) fails, fix that first:\n  " + "\n  ".join(failed))
                return 2
            print(f"baseline: {' '.join(tests)} pass")
            continue
        caught = ", ".join(failed) if failed else "NOT CAUGHT"
        if not failed:
            survived.append(m.name)
        rows.append((m.name, m.what, caught))
        print(f"{m.name}: {len(failed)} failing tests", flush=True)

    print("\n| mutation | what | caught by |\n|---|---|---|")
    for name, what, caught in rows:
        print(f"| {name} | {what} | {caught} |")
    if survived:
        print(f"\nNOT CAUGHT: {', '.join(survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
