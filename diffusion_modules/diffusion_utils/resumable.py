"""A training DataLoader whose order and per-sample randomness are fixed by (seed, epoch)
and whose position Lightning saves in every checkpoint, so a resumed run reads exactly the
batches an uninterrupted run would have read.

ResumableSampler: the order of epoch e is ``torch.randperm`` seeded with ``seed + e`` (torch's
DistributedSampler, which it extends: under DDP each rank takes its share and Lightning
does not wrap it again). It yields keys ``(index, seed, epoch)``: the dataset draws the
noise and augmentation of that read from them (hdf5dataset.py), so they depend neither on
a random stream nor on which DataLoader worker reads the item, nor on the worker count.

ResumableLoader: a DataLoader with ``state_dict``/``load_state_dict``, the interface
Lightning's fit loop looks for on a training loader: the state, ``{epoch, batches,
batch_size}``, is the number of batches of the current epoch handed to the trainer (a
finished epoch is saved as the start of the next). Lightning loads it before it makes the
loader's iterator, and the sampler then skips the samples already trained on.
"""
from __future__ import annotations

from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) indices of ``dataset`` split over ``num_replicas`` ranks, as
    keys ``(index, seed, epoch)``; ``resume(epoch, skip)`` makes the next pass over that
    epoch leave out its first ``skip`` samples."""

    def __init__(self, dataset, seed: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=int(seed))
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, skip: int) -> None:
        self.set_epoch(int(epoch))
        self._resume = (int(epoch), int(skip))

    def pending_skip(self) -> int:
        """Samples the next pass leaves out (0 unless resumed into the current epoch)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def __iter__(self):
        skip, epoch = self.pending_skip(), self.epoch
        self._resume = None
        indices = list(super().__iter__())[skip:]
        return iter([(int(i), self.seed, epoch) for i in indices])


class ResumableLoader(DataLoader):
    """A DataLoader over a ResumableSampler that Lightning can save and restore (module
    docstring). With another sampler (Lightning swaps in a SequentialSampler for
    ``overfit_batches``) it has no state."""

    _position: tuple[int, int] | None = None  # (epoch, batches handed out) of the pass in progress

    def __iter__(self):
        sampler = self.sampler if isinstance(self.sampler, ResumableSampler) else None
        if sampler is None:
            yield from super().__iter__()
            return
        epoch, done = sampler.epoch, sampler.pending_skip() // self.batch_size
        for batch in super().__iter__():
            done += 1
            self._position = (epoch, done)
            yield batch

    def state_dict(self) -> dict:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            return {}
        epoch = sampler.epoch
        if self._position is not None and self._position[0] == epoch:
            batches = self._position[1]
        else:  # this epoch's pass has not begun
            batches = sampler.pending_skip() // self.batch_size
        if batches >= len(self):  # the epoch is complete: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state and isinstance(self.sampler, ResumableSampler):
            self.sampler.resume(state["epoch"], state["batches"] * state["batch_size"])
