"""The documentation's promises: a short README with the two fresh-machine commands (the test
one is what CI runs), links that resolve, and every config listed in MODEL_ZOO.md."""
import os
import re

from randwire_d2 import model_zoo

from conftest import REPO

DEMO_COMMAND = (
    "bash tools/setup.sh && .venv/bin/python tools/train_net.py --config-file configs/demo/randwire_frcnn_demo.yaml"
)
TEST_COMMAND = "bash tools/setup.sh && .venv/bin/python -m pytest -q tests"


def _read(rel):
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        return f.read()


def _docs():
    docs = [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(REPO, "docs"))) if f.endswith(".md")]
    return ["README.md", "MODEL_ZOO.md", *docs]


def test_readme_is_short_and_has_the_two_commands():
    readme = _read("README.md")
    assert len(readme.splitlines()) <= 200
    lines = readme.splitlines()
    assert DEMO_COMMAND in lines and TEST_COMMAND in lines
    ci = [line for line in _read(".ci/run").splitlines() if line and not line.startswith("#")]
    assert ci[-1] == TEST_COMMAND


def _slug(heading):
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    broken = []
    for doc in _docs():
        for link in re.findall(r"\]\(([^)\s]+)\)", _read(doc)):
            if "://" in link:
                continue
            path, _, anchor = link.partition("#")
            target = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            if not os.path.exists(os.path.join(REPO, target)):
                broken.append(f"{doc}: {link}")
            elif anchor and anchor not in {_slug(h) for h in re.findall(r"^#+ (.*)$", _read(target), re.M)}:
                broken.append(f"{doc}: {link} (no such heading)")
    assert broken == []


def test_model_zoo_md_lists_every_config():
    listed = _read("MODEL_ZOO.md")
    configs = [n for n in model_zoo.list_configs()
               if not os.path.basename(n).startswith("Base-") and not n.startswith("lazy/common/")]
    assert {"randwire_frcnn.yaml", "lazy/randwire_frcnn.py", "baselines/faster_rcnn_R_50_FPN_demo.yaml"} <= set(configs)
    assert [n for n in configs if f"`{n}`" not in listed] == []
