"""Training and evaluation batches straight from the dataset memmap.

``TrainBatches.batch(step)`` is a pure function of ``(seed, step)``:

* ``epoch = step // steps_per_epoch``; the train subset (``ds.train_indices(train_cells)``,
  only ever the train split) is permuted by a generator seeded with ``(seed, epoch)``;
* the batch is the contiguous slice ``[j*B, (j+1)*B)`` of that permutation, ``j = step %
  steps_per_epoch``. The last partial batch of an epoch is DROPPED: ``steps_per_epoch =
  n_train // B``, every batch has exactly ``B`` cells (so steps x B = cells seen), each cell
  is visited at most once per epoch, and the dropped ``n_train % B`` cells differ between
  epochs because the permutation does;
* rows are read from the memmap in sorted order (locality), then put back in batch order,
  and returned as float32 even when stored as float16;
* the mask is Bernoulli(mask_prob) from a generator seeded with ``(seed, step)`` (so it is
  resampled at every draw of a cell), with at least one masked gene per cell — the same rule
  as the fixed evaluation mask (``cellscale.data.mask.draw_mask``).

Resuming a run therefore needs only the step number.

``with_counts=True`` (the ``nb`` objective) adds the batch's raw counts (float32 [B, V]) and
``log(library_size / target_sum)`` (float32 [B]) to every batch: ``(values, mask, counts,
log_scale)``. The library size is the dataset's, over all genes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from cellscale.data.mask import draw_mask, seed_sequence
from cellscale.data.store import Dataset
from cellscale.errors import DataError, RunError

__all__ = ["TrainBatches", "RankBatches", "eval_batches", "CountsView"]


def _read_rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows] as float32, reading the memmap in ascending row order."""
    order = np.argsort(rows, kind="stable")
    block = values[rows[order]]
    out = np.empty((rows.size, values.shape[1]), dtype=np.float32)
    out[order] = block
    return out


class CountsView:
    """Raw counts and log(library size / target_sum) of a dataset's rows, for count likelihoods."""

    def __init__(self, ds: Dataset) -> None:
        if ds.counts is None:
            raise DataError(
                f"{ds.path} holds no raw counts (built from normalised values, or simulated in "
                "gaussian mode): the nb objective needs counts; use objective mse or gaussian-nll"
            )
        if np.any(ds.library_scale <= 0):
            raise DataError(f"{ds.path}: a cell has a library size <= 0; rebuild the dataset")
        self.counts = ds.counts
        self.log_scale = np.log(ds.library_scale).astype(np.float32)

    def rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(_read_rows(self.counts, rows)), torch.from_numpy(self.log_scale[rows])


class TrainBatches:
    """Deterministic, resumable training batches of the train split (see module doc)."""

    def __init__(
        self,
        ds: Dataset,
        *,
        train_cells: int | None = None,
        batch_size: int,
        seed: int,
        mask_prob: float = 0.15,
        prefetch: int = 4,
        with_counts: bool = False,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < mask_prob < 1.0:
            raise DataError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.ds = ds
        self.indices = np.asarray(ds.train_indices(train_cells), dtype=np.int64)
        self.n_cells = int(self.indices.size)
        if self.n_cells < batch_size:
            raise DataError(
                f"{self.n_cells} training cells are fewer than batch_size {batch_size}: "
                "lower the batch size or use more training cells"
            )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.mask_prob = float(mask_prob)
        self.prefetch = max(1, int(prefetch))
        self.steps_per_epoch = self.n_cells // self.batch_size
        self._values = ds.values
        self._counts = CountsView(ds) if with_counts else None
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        """Dataset row indices of the train subset in the order of ``epoch``."""
        with self._lock:
            if self._perm_epoch != epoch:
                rng = np.random.default_rng(seed_sequence(self.seed, "train-order", epoch))
                self._perm = self.indices[rng.permutation(self.n_cells)]
                self._perm_epoch = epoch
            return self._perm

    def rows(self, step: int) -> np.ndarray:
        """Dataset row indices of the cells of batch ``step`` (in batch order)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, j = divmod(int(step), self.steps_per_epoch)
        return self.permutation(epoch)[j * self.batch_size : (j + 1) * self.batch_size]

    def mask(self, step: int) -> np.ndarray:
        rng = np.random.default_rng(seed_sequence(self.seed, "train-mask", int(step)))
        return draw_mask(rng, self.batch_size, self._values.shape[1], self.mask_prob)

    def batch_numpy(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return _read_rows(self._values, self.rows(step)), self.mask(step)

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """``(values float32 [B, V], mask bool [B, V])`` of step ``step``: pure in (seed, step);
        ``+ (counts, log_scale)`` with ``with_counts``."""
        values, mask = self.batch_numpy(step)
        item = (torch.from_numpy(values), torch.from_numpy(mask))
        if self._counts is None:
            return item
        return item + self._counts.rows(self.rows(step))

    def iterate(self, start_step: int = 0, n_steps: int | None = None, *,
                pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``batch(start_step)``, ``batch(start_step + 1)``, ... (``n_steps`` of them, or
        forever when None), prepared by a background thread through a bounded queue.
        ``pin_memory`` (for a CUDA device): that thread also copies each batch's tensors into
        page-locked memory, so the trainer's ``non_blocking`` copies to the device are
        asynchronous (from pageable memory they are not)."""
        stop = None if n_steps is None else start_step + int(n_steps)
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        halt = threading.Event()
        done = object()

        def produce() -> None:
            step = start_step
            try:
                while not halt.is_set() and (stop is None or step < stop):
                    item = self.batch(step)
                    if pin_memory:
                        item = tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in item)
                    while not halt.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    step += 1
                item = done
            except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
                item = err
            while not halt.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        thread = threading.Thread(target=produce, name="cellscale-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            halt.set()
            thread.join(timeout=5)

    def __len__(self) -> int:
        return self.steps_per_epoch



class RankBatches(TrainBatches):
    """Rank ``rank``'s contiguous slice of each global batch of :class:`TrainBatches`.

    ``batch(step)`` returns ``(values[B/W, V], mask[B/W, V], n_masked_global)`` (with
    ``counts`` and ``log_scale`` before the count under ``with_counts``): the rows and mask are
    exactly the single-process batch's rows ``[rank*B/W, (rank+1)*B/W)``, and
    ``n_masked_global`` counts the masked positions of the whole global batch. With one rank
    (the default) it is the single-process batch plus its masked count, so one training step
    serves one process and W alike."""

    def __init__(self, ds: Dataset, *, world_size: int = 1, rank: int = 0, **kw) -> None:
        super().__init__(ds, **kw)
        if self.batch_size % world_size:
            raise RunError(
                f"train batch_size {self.batch_size} is not divisible by the {world_size} "
                f"processes: use a batch size that is a multiple of {world_size}"
            )
        self.world_size, self.rank = int(world_size), int(rank)
        self.local_size = self.batch_size // self.world_size

    def batch(self, step: int) -> tuple:  # type: ignore[override]
        rows = self.rows(step)
        mask = self.mask(step)
        lo, hi = self.rank * self.local_size, (self.rank + 1) * self.local_size
        item: tuple = (torch.from_numpy(_read_rows(self._values, rows[lo:hi])),
                       torch.from_numpy(mask[lo:hi].copy()))
        if self._counts is not None:
            item += self._counts.rows(rows[lo:hi])
        return (*item, int(mask.sum()))

def eval_batches(
    ds: Dataset, split: str, *, batch_size: int, max_cells: int | None = None,
    with_counts: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield ``(values float32 [b, V], mask bool [b, V])`` over ``split`` in split order, under
    the dataset's fixed evaluation mask; with ``max_cells`` over the fixed, stratified subset of
    that many cells (``Dataset.eval_positions``), in split order; ``+ (counts, log_scale)`` with
    ``with_counts``."""
    if split == "train":
        raise DataError("eval_batches is for held-out splits: use 'val' or 'test'")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    rows = ds.splits.get(split)
    if rows is None:
        raise DataError(f"unknown split '{split}': use one of {sorted(ds.splits)}")
    positions = ds.eval_positions(split, max_cells)
    rows, mask = rows[positions], ds.eval_mask(split)[positions]
    counts = CountsView(ds) if with_counts else None
    values = ds.values
    for start in range(0, rows.size, batch_size):
        stop = min(start + batch_size, rows.size)
        item = (torch.from_numpy(_read_rows(values, rows[start:stop])), torch.from_numpy(mask[start:stop].copy()))
        yield item if counts is None else item + counts.rows(rows[start:stop])
