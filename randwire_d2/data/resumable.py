"""Training data whose global batch ``i`` is a pure function of ``(seed, i)``.

Whatever the number of processes or loader workers, a run resumed at iteration ``i``
sees exactly the batches an uninterrupted run would have seen (images and their random
augmentation). Used for detection and classification training alike.
"""
import contextlib
import itertools
import logging
import random
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata

from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from .validation import DataError

logger = logging.getLogger("randwire_d2")


def derive_seed(*values: int) -> int:
    """A 32-bit seed mixing non-negative integers (numpy's SeedSequence hash)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


_TAG_EPOCH, _TAG_SAMPLE, _TAG_STEP, _TAG_LOADER = 0, 1, 2, 3


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed python's, numpy's and torch's global RNGs (the ones detectron2's transforms and
    the mappers draw from) for the duration of the block, then restore their states."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class GlobalBatchStream:
    """The training stream of global batches, a pure function of (seed, iteration).

    Element ``p`` of the stream is image ``perm_e[p % n]`` with ``perm_e`` a permutation of
    the ``n`` images seeded by ``(seed, e = p // n)``; global batch ``i`` holds elements
    ``[i*B, (i+1)*B)``. With ``buckets`` (aspect-ratio grouping) a batch is filled from one
    bucket only, in stream order, as detectron2's ``AspectRatioGroupedDataset`` does,
    but over the *global* stream, so every process shares the bucket of a batch.
    Each item is ``(position, index)``: ``position`` seeds the image's augmentation.
    """

    def __init__(self, size: int, seed: int, total_batch_size: int, buckets: Optional[np.ndarray] = None):
        if size <= 0:
            raise ValueError("The training dataset is empty.")
        self.size, self.seed, self.batch = int(size), int(seed), int(total_batch_size)
        self.buckets = None if buckets is None or len(set(buckets.tolist())) < 2 else buckets

    def _perm(self, epoch: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _TAG_EPOCH, epoch))
        return torch.randperm(self.size, generator=gen).numpy()

    def _elements(self, start: int = 0) -> Iterator[Tuple[int, int]]:
        epoch, offset = divmod(start, self.size)
        position = start
        for e in itertools.count(epoch):
            perm = self._perm(e)
            for j in range(offset, self.size):
                yield position, int(perm[j])
                position += 1
            offset = 0

    def batches(self, start_iter: int = 0) -> Iterator[List[Tuple[int, int]]]:
        """Global batches ``start_iter, start_iter + 1, ...`` (infinite)."""
        if self.buckets is None:  # random access: no need to replay the stream
            elements = self._elements(start_iter * self.batch)
            while True:
                yield list(itertools.islice(elements, self.batch))
        filling: Dict[int, list] = {}
        emitted = 0
        for item in self._elements(0):  # grouping depends on history: replay indices only
            bucket = filling.setdefault(int(self.buckets[item[1]]), [])
            bucket.append(item)
            if len(bucket) == self.batch:
                if emitted >= start_iter:
                    yield list(bucket)
                emitted += 1
                bucket.clear()


def _first(batch):
    return batch


class _RankBatches(torchdata.IterableDataset):
    """This process's share of each global batch, mapped with per-image seeds; batch ``j``
    of the stream goes to loader worker ``j % num_workers``, so the order of batches does
    not depend on the number of workers."""

    def __init__(self, dicts, mapper, stream: GlobalBatchStream, start_iter, rank, world, collate):
        self.dicts, self.mapper, self.stream = dicts, mapper, stream
        self.start_iter, self.rank, self.world, self.collate = start_iter, rank, world, collate
        self.per_rank = stream.batch // world

    def _map(self, position: int, index: int):
        for attempt in range(10):
            with seeded_rngs(derive_seed(self.stream.seed, _TAG_SAMPLE, position, attempt)):
                out = self.mapper(self.dicts[index])
            if out is not None:
                return out
            # the mapper rejected the image (detectron2 convention): a deterministic substitute
            logger.warning(f"The mapper returned None for dataset index {index}; using another image.")
            index = derive_seed(self.stream.seed, _TAG_SAMPLE, position, attempt, 1) % len(self.dicts)
        raise DataError(f"The mapper rejected 10 images in a row (last dataset index {index}).")

    def __iter__(self):
        info = torchdata.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        lo = self.rank * self.per_rank
        for j, batch in enumerate(self.stream.batches(self.start_iter)):
            if j % num_workers == worker:
                yield self.collate([self._map(p, i) for p, i in batch[lo : lo + self.per_rank]])


class ResumableTrainLoader:
    """Iterable of this process's training batches (lists of mapped dicts) where global
    batch ``i`` depends only on ``(seed, i)`` (see :class:`GlobalBatchStream`).

    Iteration starts at ``start_iter`` (set by ``Trainer.resume_or_load``) and is lazy:
    nothing is loaded, and no worker started, until the first batch is requested, which
    is after resuming even with detectron2 v0.6 (whose SimpleTrainer calls ``iter()`` in
    its constructor).
    """

    def __init__(
        self,
        dataset_dicts: List[Dict],
        mapper,
        *,
        total_batch_size: int,
        seed: int,
        num_workers: int = 0,
        aspect_ratio_grouping: bool = False,
        collate_fn=None,
        loader_kwargs: Optional[Dict] = None,
        batch_transform=None,
    ):
        world = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be a positive multiple of the "
                f"number of processes ({world})."
            )
        buckets = None
        if aspect_ratio_grouping:
            buckets = np.array(
                [0 if d.get("width", 1) > d.get("height", 1) else 1 for d in dataset_dicts], dtype=np.int8
            )
        self.seed = int(seed)
        self.start_iter = 0
        self.total_batch_size = int(total_batch_size)
        self._size = len(dataset_dicts)
        self._buckets = buckets
        self._dicts = DatasetFromList(dataset_dicts, copy=True)
        self._mapper = mapper
        self._num_workers = int(num_workers)
        self._collate = collate_fn or _first
        self._loader_kwargs = dict(loader_kwargs or {})
        self._batch_transform = batch_transform  # applied in this process (e.g. decoding on the GPU)

    def stream(self) -> GlobalBatchStream:
        return GlobalBatchStream(self._size, self.seed, self.total_batch_size, self._buckets)

    def __iter__(self):
        dataset = _RankBatches(
            self._dicts, self._mapper, self.stream(), self.start_iter,
            comm.get_rank(), comm.get_world_size(), self._collate,
        )
        kwargs = dict(self._loader_kwargs)
        if self._num_workers == 0:
            kwargs.pop("prefetch_factor", None)
            kwargs.pop("persistent_workers", None)
        else:  # workers outlive a SIGTERM/Ctrl-C sent to all processes: see .workers
            from .workers import loader_worker_init

            kwargs.setdefault("worker_init_fn", loader_worker_init)
        # its own generator: creating the loader iterator must not draw from the global
        # torch RNG, whose state at a given iteration would then depend on where the run started
        generator = torch.Generator().manual_seed(derive_seed(self.seed, _TAG_LOADER, self.start_iter, comm.get_rank()))
        loader = torchdata.DataLoader(
            dataset, batch_size=None, num_workers=self._num_workers, collate_fn=_first, generator=generator, **kwargs
        )
        if self._batch_transform is None:
            yield from loader
        else:
            for batch in loader:
                yield self._batch_transform(batch)


def training_seed(cfg) -> int:
    """cfg.SEED, or (SEED < 0) a random seed shared by all processes."""
    return int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())
