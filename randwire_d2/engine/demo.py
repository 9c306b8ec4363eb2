#!/usr/bin/env python
"""Run a trained detector on images and save visualisations (``tools/demo.py``).

Example::

    python tools/demo.py --config-file configs/demo/randwire_frcnn_demo.yaml \
        --input path/to/images/ more.jpg "shots/*.png" --output vis/ \
        --confidence-threshold 0.5 --opts MODEL.WEIGHTS output/model_final.pth MODEL.DEVICE cpu

Each input image ``X.ext`` is written as ``<output>/X.png`` with its boxes,
class names and scores drawn by detectron2's ``Visualizer``. ``--input`` takes
files, directories (all images directly inside) and glob patterns. Options
after ``--opts`` are ``KEY VALUE`` pairs merged into the config last, as in
detectron2's own demo.
"""
import argparse
import glob
import logging
import os
import time

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

logger = logging.getLogger("randwire_d2.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run a RandWire detector on images and save visualisations."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="image files, directories (all images inside) or glob patterns",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="directory to write <name>.png visualisations to (created if needed)",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score for a detection to be shown",
    )
    parser.add_argument(
        "--opts",
        help="config options as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth MODEL.DEVICE cpu",
        default=[],
        nargs=argparse.REMAINDER,
    )
    return parser


def _is_image(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS)


def collect_inputs(inputs):
    """Expand files / directories / globs into a sorted, de-duplicated list.

    Raises FileNotFoundError naming an input that matches nothing, and
    ValueError if no image is found at all.
    """
    found = []
    for item in inputs:
        expanded = os.path.expanduser(item)
        if os.path.isdir(expanded):
            found.extend(
                os.path.join(expanded, f)
                for f in sorted(os.listdir(expanded))
                if _is_image(os.path.join(expanded, f))
            )
        elif os.path.isfile(expanded):
            found.append(expanded)
        elif glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise FileNotFoundError(f"--input pattern matches nothing: {item}")
            found.extend(m for m in matches if _is_image(m))
        else:
            raise FileNotFoundError(f"--input path does not exist: {item}")
    seen, images = set(), []
    for p in found:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            images.append(p)
    if not images:
        raise ValueError(
            "no images found in --input ({}); supported extensions: {}".format(
                " ".join(inputs), " ".join(IMAGE_EXTENSIONS)
            )
        )
    return images


def setup_cfg(args):
    from randwire_d2.engine import setup_cfg as load_cfg

    cfg = load_cfg(args.config_file, args.opts)  # also registers DATASETS.COCO_JSON / VOC
    # apply the threshold to every kind of head the config may use
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    return cfg


def class_metadata(cfg):
    """Metadata with the class names of the config's dataset (DATASETS.TEST[0], else TRAIN[0]),
    so boxes are labelled "circle 74%", not "0 74%". Refuses a model whose class count differs."""
    from detectron2.data import MetadataCatalog

    from randwire_d2.data.custom import check_dataset_classes, dataset_class_names

    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    if not names:
        logger.warning("cfg.DATASETS.TEST and TRAIN are empty: boxes are labelled with class ids")
        return MetadataCatalog.get("__unused")
    name = names[0]
    try:
        classes = dataset_class_names(name)
    except ValueError as e:  # e.g. an unreadable json: the demo still runs
        logger.warning("%s; boxes are labelled with class ids", e)
        classes = None
    if classes is None:
        logger.warning("dataset %r has no class names (its annotation file missing?): boxes are "
                       "labelled with class ids", name)
    else:
        check_dataset_classes(cfg, [name])
    return MetadataCatalog.get(name)


def build_predictor(cfg):
    """detectron2's DefaultPredictor with the weights loaded as for training and evaluation
    (RandWireCheckpointer: graph specs, shapes, every tensor, or a one-line refusal);
    returns it and the class names the checkpoint records (None if it records none)."""
    from detectron2.engine import DefaultPredictor

    from randwire_d2.checkpoint import RandWireCheckpointer

    unloaded = cfg.clone()
    unloaded.defrost()
    unloaded.MODEL.WEIGHTS = ""  # DefaultPredictor would load them with no checks
    unloaded.freeze()
    predictor = DefaultPredictor(unloaded)
    predictor.cfg = cfg
    if not cfg.MODEL.WEIGHTS:
        return predictor, None
    if "://" not in cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise FileNotFoundError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} does not exist")
    checkpointer = RandWireCheckpointer(predictor.model, complete=True)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    return predictor, checkpointer.loaded_class_names


def checkpoint_metadata(class_names, dataset_metadata):
    """Label boxes with the class names the checkpoint was trained on."""
    from detectron2.data import MetadataCatalog

    given = dataset_metadata.get("thing_classes", None)
    if given is not None and list(given) != list(class_names):
        logger.warning("the checkpoint was trained on classes %s, not on dataset %r's %s: boxes are labelled "
                       "with the checkpoint's", list(class_names), dataset_metadata.name, list(given))
    name = "__randwire_demo_checkpoint"
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    return MetadataCatalog.get(name).set(thing_classes=list(class_names))


def _unique_output_path(out_dir: str, image_path: str, used: set) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    name, k = stem, 1
    while name in used:  # same stem from two folders: a.png, a_1.png, ...
        name = f"{stem}_{k}"
        k += 1
    used.add(name)
    return os.path.join(out_dir, name + ".png")


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)

    from detectron2.utils.logger import setup_logger

    setup_logger(name="randwire_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    logger.info("Arguments: %s", args)

    if not os.path.isfile(args.config_file):
        logger.error("--config-file does not exist: %s", args.config_file)
        return 2
    try:
        images = collect_inputs(args.input)
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2

    import randwire_d2  # noqa: F401  registers backbones and demo datasets
    from randwire_d2.data.demo import register_demo_datasets

    register_demo_datasets()  # idempotent; makes sure the demo metadata exists

    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import ColorMode, Visualizer

    try:
        cfg = setup_cfg(args)
        metadata = class_metadata(cfg)
    except (KeyError, ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: predictions come from an untrained model")
    try:
        predictor, checkpoint_classes = build_predictor(cfg)
    except (ValueError, FileNotFoundError) as e:  # weights that do not fit: the same check as training
        logger.error("%s", e)
        return 2
    if checkpoint_classes:
        metadata = checkpoint_metadata(checkpoint_classes, metadata)

    os.makedirs(args.output, exist_ok=True)
    used = set()
    skipped = []
    for path in images:
        try:
            img = read_image(path, format="BGR")  # DefaultPredictor expects BGR
        except Exception as e:  # truncated / corrupt / unreadable: name it, go on with the rest
            logger.warning("skipping %s: cannot read it (%s: %s)", path, type(e).__name__, e)
            skipped.append(path)
            continue
        start = time.perf_counter()
        predictions = predictor(img)
        elapsed = time.perf_counter() - start
        instances = predictions["instances"].to("cpu")
        out_path = _unique_output_path(args.output, path, used)
        vis = Visualizer(img[:, :, ::-1], metadata, scale=1.0, instance_mode=ColorMode.IMAGE)
        vis.draw_instance_predictions(predictions=instances).save(out_path)
        logger.info(
            "%s: %d detections in %.3fs -> %s", path, len(instances), elapsed, out_path
        )
    done = len(images) - len(skipped)
    logger.info("Wrote %d visualisations to %s", done, args.output)
    if skipped:
        logger.warning("Skipped %d unreadable image(s): %s", len(skipped), " ".join(skipped))
    return 0 if done else 1

