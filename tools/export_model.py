#!/usr/bin/env python
"""Export a trained RandWire Faster R-CNN to TorchScript or ONNX, as detectron2's
tools/deploy/export_model.py does with ``--export-method tracing``.

    python tools/export_model.py --config-file configs/demo/randwire_frcnn_demo.yaml \
        --format torchscript --sample-image img.jpg --output exported/ \
        MODEL.WEIGHTS output/demo/model_final.pth MODEL.DEVICE cpu
    python tools/export_model.py --config-file CFG --format onnx --output exported/ --run-eval \
        MODEL.WEIGHTS output/demo/model_final.pth

Writes ``<output>/model.ts`` or ``<output>/model.onnx`` and ``export_info.json``
(input format and sizes, output names, class names). The model is traced on
``--sample-image`` (or the first image of DATASETS.TEST[0]) and then checked against
eager inference on it (and on every ``--check-image``): the largest box and score
differences are printed, and a mismatch fails the export. ``--run-eval`` evaluates the
exported model on DATASETS.TEST[0] with the dataset's evaluator (metrics also in
``<output>/final_metrics.json``).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("randwire_d2.export")


def get_parser():
    parser = argparse.ArgumentParser(description="Export a RandWire detector for deployment.")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript", help="output format")
    parser.add_argument("--export-method", choices=["tracing"], default="tracing",
                        help="how to export (detectron2's caffe2_tracing/scripting are not supported)")
    parser.add_argument("--sample-image", default=None, help="image to trace with (default: first of DATASETS.TEST[0])")
    parser.add_argument("--check-image", action="append", default=[], metavar="IMG",
                        help="more images to compare exported vs eager outputs on (repeatable)")
    parser.add_argument("--output", required=True, help="output directory for the exported model")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default %(default)s: randwire_d2's)")
    parser.add_argument("--run-eval", action="store_true", help="evaluate the exported model on DATASETS.TEST[0]")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER,
                        help="config options as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


def setup_cfg(args):
    from randwire_d2.engine import setup_cfg as load_cfg

    cfg = load_cfg(args.config_file, args.opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.freeze()
    return cfg


def first_test_image(cfg) -> str:
    from detectron2.data import DatasetCatalog

    from randwire_d2.data.custom import check_dataset_files
    from randwire_d2.export import ExportError

    if not len(cfg.DATASETS.TEST):
        raise ExportError("no --sample-image and cfg.DATASETS.TEST is empty: pass --sample-image IMG.")
    check_dataset_files(cfg.DATASETS.TEST[:1], "DATASETS.TEST")  # (DETECTRON2_DATASETS hint)
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    if not dicts:
        raise ExportError(f"no --sample-image and dataset {cfg.DATASETS.TEST[0]!r} is empty.")
    return dicts[0]["file_name"]


def run_eval(cfg, exported, output_dir):
    """Evaluate ``exported`` on DATASETS.TEST[0]; metrics also go to <output>/final_metrics.json."""
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    from randwire_d2.data.custom import check_dataset_classes, check_dataset_files
    from randwire_d2.engine import Trainer, write_results

    if not len(cfg.DATASETS.TEST):
        raise ValueError("--run-eval needs cfg.DATASETS.TEST.")
    dataset = cfg.DATASETS.TEST[0]
    check_dataset_files([dataset], "DATASETS.TEST")
    check_dataset_classes(cfg, [dataset])
    loader = Trainer.build_test_loader(cfg, dataset)
    evaluator = Trainer.build_evaluator(cfg, dataset, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_exported"))
    results = inference_on_dataset(exported, loader, evaluator)
    print_csv_format(results)
    write_results(output_dir, results)
    return results


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="randwire_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    logger.info("Command line arguments: %s", args)

    import randwire_d2  # noqa: F401  (registers backbones and datasets)
    from randwire_d2 import export as E

    try:
        cfg = setup_cfg(args)
        model = E.build_inference_model(cfg)
        sample_path = args.sample_image or first_test_image(cfg)
        sample = E.preprocess(cfg, E.read_image(cfg, sample_path))
        checks = [sample] + [E.preprocess(cfg, E.read_image(cfg, p)) for p in args.check_image]
        opset = args.opset if args.opset is not None else E.DEFAULT_ONNX_OPSET
        path = E.export(cfg, model, sample, args.format, args.output, opset=opset)
        exported = E.ExportedDetector(args.output)
        diff = E.compare(model, exported, checks)
    except (E.ExportError, OSError, KeyError, ValueError, ImportError) as exc:
        if os.environ.get("RANDWIRE_DEBUG"):
            raise
        logger.error("%s", exc)
        return 2
    logger.info(
        f"{path}: on {len(checks)} image(s), exported vs eager: {diff['detections']} detections, "
        f"max |box difference| {diff['max_box_diff']:.2e} px, max |score difference| {diff['max_score_diff']:.2e}"
    )
    if not diff["match"]:
        logger.error(f"The exported model's outputs differ from eager inference: {diff}")
        return 1
    if args.run_eval:
        run_eval(cfg, exported, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
