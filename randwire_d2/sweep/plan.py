"""What a sweep is: generators x seeds of one base config, each run in its own OUTPUT_DIR.

The sweep directory holds ``sweep_config.json`` (the base config's hash and values) and
``runs/<generator>/seed<S>/`` (one tools/train_net.py OUTPUT_DIR per run). The hash
covers the merged base config (file + opts) with the keys the sweep sets per run
neutralised (OUTPUT_DIR, generator keys, seeds), so adding seeds or generators to a
sweep is allowed while a changed learning rate is refused.
"""
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

from ..config import GENERATOR_KEYS
from ..graphs import GENERATORS, validate_generator_params

__all__ = [
    "SWEEP_CONFIG",
    "Generator",
    "Run",
    "SweepPlan",
    "config_fingerprint",
    "is_generator_text",
    "parse_generator",
    "parse_seeds",
]

SWEEP_CONFIG = "sweep_config.json"
_GEN_RE = re.compile(r"^\s*([A-Za-z]{2})\s*(?:\((.*)\))?\s*$")
# keys the sweep sets per run: users must not pass them as opts
SWEEP_KEYS = ("OUTPUT_DIR", "SEED", "MODEL.RANDWIRE.SEED", "MODEL.RANDWIRE.GENERATOR", "MODEL.RANDWIRE.GRAPHS_FILE") + tuple(
    f"MODEL.RANDWIRE.{k}" for keys in GENERATOR_KEYS.values() for k in keys.values()
)


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Generator:
    """A network generator: graph model + its parameters (``WS(4, 0.75)``)."""

    name: str
    params: Tuple[Tuple[str, float], ...]

    @property
    def label(self) -> str:
        return f"{self.name}({', '.join(_fmt(v) for _, v in self.params)})"

    @property
    def slug(self) -> str:
        """Directory name: ``WS_k4_p0.75``."""
        return "_".join([self.name] + [f"{k}{_fmt(v)}" for k, v in self.params])

    def opts(self) -> List[str]:
        out = ["MODEL.RANDWIRE.GENERATOR", self.name]
        for key, value in self.params:
            # repr keeps 1.0 a float: yacs refuses an int for a float key
            out += [f"MODEL.RANDWIRE.{GENERATOR_KEYS[self.name][key]}", repr(value)]
        return out


def is_generator_text(text: str) -> bool:
    """Does ``text`` look like a generator (``WS``, ``ER(0.2)``), not a config KEY or VALUE?"""
    m = _GEN_RE.match(str(text))
    return bool(m) and m.group(1).upper() in GENERATORS


def parse_generator(text: str, num_nodes: int, defaults: Mapping[str, float] = None) -> Generator:
    """``"WS(4,0.75)"``, ``"WS(k=4, p=0.75)"``, ``"ER(0.2)"``, ``"BA(5)"``; a bare ``"WS"``
    takes its parameters from ``defaults`` (the config's MODEL.RANDWIRE values).
    Validated against ``num_nodes`` (MODEL.RANDWIRE.NODES)."""
    m = _GEN_RE.match(str(text))
    allowed = "e.g. 'WS(4,0.75)', 'WS(k=4,p=0.75)', 'ER(0.2)', 'BA(5)' or a bare 'WS'"
    if not m or m.group(1).upper() not in GENERATORS:
        raise ValueError(f"--generators {text!r}: not a generator; {allowed} ({'/'.join(GENERATORS)}).")
    name, inner = m.group(1).upper(), m.group(2)
    names = GENERATORS[name]
    params: Dict[str, object] = {}
    if inner is None or not inner.strip():
        params = {k: (defaults or {}).get(k) for k in names}
        if any(v is None for v in params.values()):
            raise ValueError(f"--generators {text!r}: give the parameters {list(names)}, {allowed}.")
    else:
        parts = [p.strip() for p in inner.split(",")]
        for i, part in enumerate(parts):
            key, sep, value = part.partition("=")
            if not sep:
                if i >= len(names):
                    raise ValueError(f"--generators {text!r}: {name} takes {len(names)} parameter(s) {list(names)}.")
                key, value = names[i], part
            key = key.strip().lower()
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"--generators {text!r}: parameter {key} = {value.strip()!r} is not a number.") from None
            params[key] = int(number) if key in ("k", "m") and number.is_integer() else number
    try:
        clean = validate_generator_params(name, num_nodes, params)
    except ValueError as exc:
        raise ValueError(f"--generators {text!r} (MODEL.RANDWIRE.NODES = {num_nodes}): {exc}") from None
    return Generator(name, tuple((k, clean[k]) for k in names))


def parse_seeds(values: Sequence[str]) -> List[int]:
    """``["0-4"]`` -> [0, 1, 2, 3, 4]; also ``"0,2,7"``, ``"0-2" "9"``; order kept, duplicates dropped."""
    seeds: List[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
                raise ValueError(f"--seeds {value!r}: {part!r} is not a seed (N) or range (A-B with A <= B, A >= 0).")
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            seeds += [s for s in range(lo, hi + 1) if s not in seeds]
    if not seeds:
        raise ValueError("--seeds: no seeds given (e.g. --seeds 0-4).")
    return seeds


def _flatten(node, prefix="") -> Dict[str, object]:
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_fingerprint(cfg, fixed_training_seed: bool) -> Tuple[str, Dict[str, object]]:
    """(sha256, flat {KEY: value}) of the base config, the per-run keys neutralised."""
    import yaml

    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    rw = cfg.MODEL.RANDWIRE
    rw.GENERATOR, rw.SEED, rw.GRAPHS_FILE = "", 0, ""
    for keys in GENERATOR_KEYS.values():
        for key in keys.values():
            rw[key] = 0
    if not fixed_training_seed:
        cfg.SEED = 0
    flat = _flatten(yaml.safe_load(cfg.dump()))
    flat["sweep.fixed_training_seed"] = bool(fixed_training_seed)
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), json.loads(text)


@dataclass(frozen=True)
class Run:
    generator: Generator
    seed: int
    output_dir: str

    @property
    def name(self) -> str:
        return f"{self.generator.slug}/seed{self.seed}"


@dataclass
class SweepPlan:
    """A base config (file + opts) x generators x seeds, under ``sweep_dir``."""

    config_file: str
    opts: List[str]
    generators: List[Generator]
    seeds: List[int]
    sweep_dir: str
    fixed_training_seed: bool = False

    @classmethod
    def create(cls, config_file: str, opts: Sequence[str], generators: Sequence[str], seeds: Sequence[str],
               sweep_dir: str, fixed_training_seed: bool = False) -> "SweepPlan":
        from ..engine import setup_cfg

        opts = [str(o) for o in opts]
        if len(opts) % 2:
            raise ValueError(f"Config options must be KEY VALUE pairs; got an odd number: {opts}")
        taken = [k for k in opts[::2] if k in SWEEP_KEYS]
        if taken:
            raise ValueError(
                f"{taken} are set by the sweep for each run (OUTPUT_DIR from --output-dir, the generator "
                "from --generators, the seeds from --seeds): remove them from the config options."
            )
        cfg = setup_cfg(config_file, opts)
        if cfg.MODEL.RANDWIRE.GRAPHS_FILE:
            raise ValueError(
                f"cfg.MODEL.RANDWIRE.GRAPHS_FILE = {cfg.MODEL.RANDWIRE.GRAPHS_FILE!r} in {config_file}: every run "
                "would train those fixed graphs, whatever its generator and seed. Set it to \"\" for a sweep."
            )
        rw = cfg.MODEL.RANDWIRE
        defaults = {"k": rw.WS_K, "p": None, "m": rw.BA_M}
        if not generators:
            raise ValueError("--generators: none given (e.g. --generators 'WS(4,0.75)' 'ER(0.2)' 'BA(5)').")
        gens: List[Generator] = []
        for text in generators:
            name = _GEN_RE.match(str(text)).group(1).upper() if _GEN_RE.match(str(text)) else ""
            defaults["p"] = rw.WS_P if name == "WS" else rw.ER_P
            gen = parse_generator(text, rw.NODES, defaults)
            if gen in gens:
                raise ValueError(f"--generators: {gen.label} is given twice.")
            gens.append(gen)
        return cls(
            config_file=os.path.abspath(config_file),
            opts=opts,
            generators=gens,
            seeds=parse_seeds(seeds),
            sweep_dir=os.path.abspath(sweep_dir),
            fixed_training_seed=fixed_training_seed,
        )

    def base_cfg(self):
        from ..engine import setup_cfg

        return setup_cfg(self.config_file, self.opts)

    def run_opts(self, run: Run) -> List[str]:
        """The KEY VALUE opts of one run: the base opts with ``{generator}`` / ``{seed}``
        filled in (e.g. MODEL.WEIGHTS of each seed's own pretrained backbone), then the
        run's OUTPUT_DIR, generator and seeds."""
        def fill(value: str) -> str:
            return value.replace("{generator}", run.generator.slug).replace("{seed}", str(run.seed))

        opts = [fill(o) for o in self.opts] + ["OUTPUT_DIR", run.output_dir] + run.generator.opts()
        opts += ["MODEL.RANDWIRE.SEED", str(run.seed)]
        if not self.fixed_training_seed:
            opts += ["SEED", str(run.seed)]
        return opts

    @property
    def runs(self) -> List[Run]:
        return [
            Run(gen, seed, os.path.join(self.sweep_dir, "runs", gen.slug, f"seed{seed}"))
            for gen in self.generators
            for seed in self.seeds
        ]

    def check_or_record_config(self) -> str:
        """Write sweep_config.json on first use; afterwards refuse a different base config."""
        digest, flat = config_fingerprint(self.base_cfg(), self.fixed_training_seed)
        path = os.path.join(self.sweep_dir, SWEEP_CONFIG)
        if os.path.isfile(path):
            with open(path) as f:
                recorded = json.load(f)
            if recorded["config_hash"] != digest:
                old = recorded.get("config", {})
                diffs = [
                    f"  {k}: {old.get(k, '<absent>')!r} in the sweep, {flat.get(k, '<absent>')!r} now"
                    for k in sorted(set(old) | set(flat)) if old.get(k) != flat.get(k)
                ]
                shown = "\n".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
                raise ValueError(
                    f"Sweep directory {self.sweep_dir} was made with a different config (hash "
                    f"{recorded['config_hash'][:12]}, from {recorded.get('config_file')} "
                    f"{' '.join(recorded.get('opts', []))}); this command's config has hash {digest[:12]}. "
                    f"Differences:\n{shown}\nMixing them would compare different training settings: use a "
                    "new --output-dir, or restore the sweep's settings."
                )
            return digest
        os.makedirs(self.sweep_dir, exist_ok=True)
        record = {
            "config_hash": digest,
            "config_file": self.config_file,
            "opts": self.opts,
            "fixed_training_seed": self.fixed_training_seed,
            "config": flat,
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, path)
        return digest
