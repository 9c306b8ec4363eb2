"""The device decode path (INPUT.CLS_DECODE "device", randwire_d2.data.device_decode) against
the CPU path, run with device="cpu": same crop boxes and flips, same evaluation pixels
(decoding bit-identical to PIL, resizing within one grey level), PNG and gray JPEGs, one
stacked batch tensor, and a clear error for bad settings. Real photos: foolbox's ImageNet JPEGs.
"""
import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from randwire_d2.data.classification import (
    ClassificationDatasetMapper,
    batch_collator,
    classification_test_loader,
    classification_train_loader,
    register_image_folder,
)
from randwire_d2.data.device_decode import (
    DeviceDecoder,
    ImageBatch,
    apply_plan,
    encoded_collator,
    resolve_decode_device,
)
from randwire_d2.data.resumable import seeded_rngs

from test_classification import foolbox_imagenet_files, make_cfg  # noqa: E402  (tests dir on sys.path)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def photos():
    files = [p for p, _ in foolbox_imagenet_files()]
    assert len(files) == 20, "foolbox's ImageNet JPEGs are missing: run tools/setup.sh"
    return files


@pytest.fixture(scope="module")
def tree(tmp_path_factory, photos):
    """8 of the photos re-encoded at ImageNet-like sizes, plus a PNG and a gray JPEG."""
    root = tmp_path_factory.mktemp("decode")
    sizes = [(500, 375), (375, 500), (640, 480), (333, 500), (500, 333), (256, 256), (800, 600), (300, 227)]
    for i, (path, size) in enumerate(zip(photos, sizes)):
        d = root / f"c{i % 2}"
        d.mkdir(exist_ok=True)
        Image.open(path).convert("RGB").resize(size, Image.BICUBIC).save(d / f"{i}.JPEG", quality=90)
    Image.open(photos[8]).convert("RGB").resize((320, 240)).save(root / "c0" / "png.png")
    Image.open(photos[9]).convert("L").resize((260, 300)).save(root / "c1" / "gray.JPEG", quality=90)
    name = "test_device_decode_tree"
    register_image_folder(name, str(root))
    return name


def _dicts(name):
    from detectron2.data import DatasetCatalog

    return DatasetCatalog.get(name)


def _pair(is_train, **kw):
    return (ClassificationDatasetMapper(is_train, **kw),
            ClassificationDatasetMapper(is_train, decode_device="cpu", **kw))


def _device_images(mapper, dicts, seeds):
    encoded = []
    for d, seed in zip(dicts, seeds):
        with seeded_rngs(seed):
            encoded.append(mapper(dict(d)))
    return DeviceDecoder("cpu", mapper.crop_size, mapper.image_format)(encoded_collator(encoded)).images


def _cpu_images(mapper, dicts, seeds):
    out = []
    for d, seed in zip(dicts, seeds):
        with seeded_rngs(seed):
            out.append(mapper(dict(d))["image"])
    return torch.stack(out)


def test_decode_setting_resolves_and_names_the_key():
    assert resolve_decode_device("auto", "cpu") is None
    assert resolve_decode_device("cpu", "cuda") is None
    assert resolve_decode_device("device", "cpu") == "cpu"
    with pytest.raises(ValueError, match="INPUT.CLS_DECODE = 'gpu' is invalid: 'auto'.*'cpu'.*'device'"):
        resolve_decode_device("gpu", "cpu")
    if not torch.cuda.is_available():
        assert resolve_decode_device("auto", "cuda") is None  # CPU default off a GPU
        with pytest.raises(ValueError, match="INPUT.CLS_DECODE = 'device'.*CUDA is not available"):
            resolve_decode_device("device", "cuda")
    else:
        assert resolve_decode_device("auto", "cuda") == "cuda"


def test_val_transform_matches_the_cpu_path(tree):
    """Evaluation is deterministic: the device path gives PIL's pixels (decode identical,
    bilinear resize within one grey level), for JPEG, PNG and gray JPEG alike."""
    dicts = _dicts(tree)
    cpu, dev = _pair(False, crop_size=160, resize_size=182)
    got = _device_images(dev, dicts, range(len(dicts)))
    want = _cpu_images(cpu, dicts, range(len(dicts)))
    assert got.shape == want.shape == (len(dicts), 3, 160, 160) and got.dtype == torch.uint8
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.2, (diff.max(), diff.float().mean())
    assert torch.equal(got, _device_images(dev, dicts, range(len(dicts))))  # deterministic
    # the same geometry exactly where no resampling blurs: a half-black, half-white image
    img = np.zeros((300, 600, 3), np.uint8)
    img[:, 300:] = 255
    m = ClassificationDatasetMapper(False, crop_size=100, resize_size=150, decode_device="cpu")
    out = DeviceDecoder("cpu", 100)(encoded_collator([m({"image_array": img, "label": 3})]))
    assert out.images[0, :, :, :45].max() == 0 and out.images[0, :, :, 55:].min() == 255


def test_train_crops_and_flips_are_the_cpu_paths(tree):
    """Same per-image seed -> same crop box and flip: the pictures agree (up to the
    resampling at the crop's border, where PIL also reads pixels outside the box)."""
    dicts = _dicts(tree)
    cpu, dev = _pair(True, crop_size=128)
    for seeds in (range(0, 10), range(100, 110)):
        got, want = _device_images(dev, dicts, seeds).float(), _cpu_images(cpu, dicts, seeds).float()
        inner = (got - want)[:, :, 2:-2, 2:-2].abs()
        assert inner.mean() < 1.0, inner.mean()
        # a wrong flip or box would differ by tens of grey levels
        assert (got - want).abs().mean(dim=(1, 2, 3)).max() < 3.0


def test_crop_box_distributions_agree(tree):
    """Boxes drawn by the device path's workers (file headers) and by the CPU path (decoded
    images) have the same distribution of area fraction, aspect ratio and flips."""
    from randwire_d2.data import classification as C

    d = _dicts(tree)[0]
    w, h = Image.open(d["file_name"]).size
    cpu, dev = _pair(True)
    boxes_cpu, calls = [], []
    real = C._random_resized_crop_box

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    C._random_resized_crop_box = spy
    try:
        for seed in range(300):
            with seeded_rngs(seed):
                cpu(dict(d))
    finally:
        C._random_resized_crop_box = real
    boxes_cpu = np.array(calls)
    plans = []
    for seed in range(300, 600):  # other seeds: a distribution, not the same draws
        with seeded_rngs(seed):
            plans.append(dev(dict(d))["crop_plan"])
    plans = np.array(plans)

    def stats(boxes):
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        return (bw * bh / (w * h)), np.log(bw / bh)

    area_c, ratio_c = stats(boxes_cpu)
    area_d, ratio_d = stats(plans[:, :4])
    assert area_d.min() >= 0.07 and area_d.max() <= 1.0 and np.abs(ratio_d).max() <= math.log(4 / 3) + 0.02
    for a, b in ((area_c, area_d), (ratio_c, ratio_d)):  # two-sample Kolmogorov-Smirnov statistic
        grid = np.sort(np.concatenate([a, b]))
        ks = np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                    - np.searchsorted(np.sort(b), grid, "right") / len(b)).max()
        assert ks < 0.15, ks  # 1% critical value for n = m = 300: 0.133
    flips = plans[:, -1]
    assert set(flips) <= {0, 1} and 0.4 < flips.mean() < 0.6


def test_pad_crop_and_bgr_match_the_cpu_path():
    rng = np.random.RandomState(0)
    arrays = [rng.randint(0, 256, (28, 28), dtype=np.uint8) for _ in range(6)]
    dicts = [{"image_array": a, "label": i, "image_id": i} for i, a in enumerate(arrays)]
    kw = dict(crop_size=32, resize_size=32, train_augmentation="pad_crop", pad=4, image_format="BGR")
    cpu, dev = _pair(True, **kw)
    got = _device_images(dev, dicts, range(6))
    want = _cpu_images(cpu, dicts, range(6))
    assert (got.int() - want.int()).abs().max() <= 1  # 28 -> 32 resize, then identical padding and flips
    assert (got == 0).any()  # the padding is there


def test_loaders_hand_over_one_batch_tensor(tree):
    """Both paths' loaders yield an ImageBatch: one uint8 tensor the dicts view, one label
    tensor; the device path through the real train and test loaders."""
    dicts = _dicts(tree)
    cpu_batch = batch_collator([ClassificationDatasetMapper(False, crop_size=64, resize_size=72)(dict(d))
                                for d in dicts[:4]])
    assert isinstance(cpu_batch, ImageBatch) and cpu_batch.images.shape == (4, 3, 64, 64)
    assert cpu_batch[2]["image"].data_ptr() == cpu_batch.images[2].data_ptr()
    assert cpu_batch.labels.tolist() == [d["label"] for d in dicts[:4]]
    dev = ClassificationDatasetMapper(True, crop_size=64, decode_device="cpu")
    batch = next(iter(classification_train_loader(tree, dev, total_batch_size=4, seed=0)))
    assert isinstance(batch, ImageBatch) and batch.images.shape == (4, 3, 64, 64)
    assert batch.labels.dtype == torch.int64 and len(batch) == 4 and batch[0]["height"] == 64
    # same seed on the CPU path: the same images, the same crops
    cpu = ClassificationDatasetMapper(True, crop_size=64)
    cpu_batch = next(iter(classification_train_loader(tree, cpu, total_batch_size=4, seed=0)))
    assert [d["image_id"] for d in batch] == [d["image_id"] for d in cpu_batch]
    assert (batch.images.float() - cpu_batch.images.float()).abs().mean() < 3.0
    test = classification_test_loader(tree, ClassificationDatasetMapper(False, crop_size=64, resize_size=72,
                                                                        decode_device="cpu"), batch_size=4)
    assert len(test) == 3 and sum(len(b) for b in test) == len(dicts)


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    mapper = ClassificationDatasetMapper(True, decode_device="cpu")
    with pytest.raises(ValueError, match="broken.JPEG"):
        mapper({"file_name": str(bad), "label": 0})
    # a valid header with broken data: the main process names the file
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    trunc = tmp_path / "truncated.JPEG"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out = mapper({"file_name": str(trunc), "label": 0})
    with pytest.raises(ValueError, match="Cannot decode JPEG .*truncated.JPEG.* on cpu: Image is incomplete"):
        DeviceDecoder("cpu", 224)(encoded_collator([out]))


def test_apply_plan_shift_and_flip_exact():
    img = torch.arange(3 * 6 * 6, dtype=torch.uint8).reshape(3, 6, 6)
    out = apply_plan(img, (0, 0, 6, 6, 6, 6, 1, 1, 1, -1, 1), 4)  # window at (1,1), shifted, flipped
    window = img[:, 1:5, 1:5]
    want = torch.zeros_like(window)
    want[:, 1:, :3] = window[:, :3, 1:]
    assert torch.equal(out, want.flip(2))


def test_classifier_takes_the_stacked_batch():
    from detectron2.modeling import build_model


    cfg = make_cfg(**{"INPUT.CROP_SIZE": 32})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    dicts = [{"image": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), "label": i % 10} for i in range(4)]
    stacked = ImageBatch.stack(dicts)
    torch.manual_seed(1)
    a = model(stacked)["loss_cls"]
    torch.manual_seed(1)
    b = model(list(dicts))["loss_cls"]
    assert torch.equal(a, b)


def test_pre_launch_check_names_a_bad_decode_setting():
    from randwire_d2.engine.run_settings import check_run_values

    cfg = make_cfg(**{"SOLVER.IMS_PER_BATCH": 4})
    check_run_values(cfg, classification=True)
    cfg.INPUT.CLS_DECODE = "gpu"
    with pytest.raises(ValueError, match="INPUT.CLS_DECODE.*'gpu'.*'auto', 'cpu', 'device'"):
        check_run_values(cfg, classification=True)
    mapper = ClassificationDatasetMapper(True, decode_device="auto")  # LazyConfig's default
    assert mapper.decode_device == ("cuda" if torch.cuda.is_available() else None)


def test_ddp_input_moving_keeps_the_batch_whole():
    """DistributedDataParallel moves a list's tensors one by one into a plain list; the
    ImageBatch passes through as one object (its single copy happens in the model)."""
    from torch.distributed.utils import _to_kwargs

    dicts = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "label": i} for i in range(3)]
    batch = ImageBatch.stack(dicts)
    target = torch.device("meta")  # any device other than the tensors' own
    moved, _ = _to_kwargs((list(dicts),), {}, target, False)
    assert type(moved[0][0]) is list and moved[0][0][0]["image"].device == target  # what a list gets
    moved, _ = _to_kwargs((batch,), {}, target, False)
    assert moved[0][0] is batch
    assert isinstance(batch[1:], list) and [d["label"] for d in batch] == [0, 1, 2]


def test_trainer_trains_and_evaluates_on_the_device_path(tree):
    """INPUT.CLS_DECODE "device" through the engine's loaders, the model and the evaluator."""
    from detectron2.modeling import build_model

    from randwire_d2.engine import Trainer
    from randwire_d2.evaluation import ClassificationEvaluator

    cfg = make_cfg(**{"DATASETS.TRAIN": (tree,), "DATASETS.TEST": (tree,), "SOLVER.IMS_PER_BATCH": 4,
                      "TEST.IMS_PER_BATCH": 4, "INPUT.CROP_SIZE": 32, "INPUT.RESIZE_SIZE": 36,
                      "INPUT.CLS_DECODE": "device", "MODEL.RANDWIRE.NUM_CLASSES": 2})
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = next(iter(Trainer.build_train_loader(cfg)))
    assert isinstance(batch, ImageBatch) and batch.images.shape == (4, 3, 32, 32)
    loss = model(batch)["loss_cls"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    ev = ClassificationEvaluator(tree, distributed=False)
    ev.reset()
    with torch.no_grad():
        for inputs in Trainer.build_test_loader(cfg, tree):
            ev.process(inputs, model(inputs))
    assert ev.evaluate()["classification"]["num_images"] == len(_dicts(tree))
