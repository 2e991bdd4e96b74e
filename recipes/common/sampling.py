"""Length-grouped batching that keeps image and text-only samples in separate batches.

transformers' `train_sampling_strategy: group_by_length` sorts by length alone, so text-only samples
(a few dozen tokens) share batches with image samples (hundreds of image tokens more) and are padded
to their length. LLaVA groups the two modalities apart for that reason; so does this sampler. Its
order depends on (seed, epoch) only, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class ModalityLengthGroupedSampler(Sampler[int]):
    """Indices whose consecutive `batch_size` blocks are one modality and of similar length.

    Per modality: shuffle, sort by length inside mega-batches of `mega_batch_mult` batches (as
    transformers' `get_length_grouped_indices` does), cut into batches. The full batches of both
    modalities are then shuffled together, the batch with the longest sample goes first (an
    out-of-memory error shows at once), and the two partial batches, if any, go last: only the final
    batch of an epoch can mix modalities. With several processes each takes whole `batch_size` blocks
    in turn, so `batch_size` is the per-device batch size.
    """

    def __init__(self, lengths: list[int], has_image: list[bool], batch_size: int, seed: int = 0,
                 mega_batch_mult: int = 50):
        if len(lengths) != len(has_image):
            raise ValueError(f"{len(lengths)} lengths for {len(has_image)} has_image flags")
        self.lengths, self.has_image = np.asarray(lengths), np.asarray(has_image, dtype=bool)
        self.batch_size, self.seed, self.mega = batch_size, seed, mega_batch_mult * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate) at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        full, partial = [], []
        for modality in (True, False):
            group = np.flatnonzero(self.has_image == modality)
            group = group[rng.permutation(len(group))]
            ordered = []
            for start in range(0, len(group), self.mega):
                mega = group[start:start + self.mega]
                ordered += mega[np.argsort(-self.lengths[mega], kind="stable")].tolist()
            chunks = [ordered[i:i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
            if chunks and len(chunks[-1]) < self.batch_size:
                partial += chunks.pop()
            full += chunks
        full = [full[i] for i in rng.permutation(len(full))]
        if full:
            longest = max(range(len(full)), key=lambda b: self.lengths[full[b]].max())
            full[0], full[longest] = full[longest], full[0]
        tail = [partial[i:i + self.batch_size] for i in range(0, len(partial), self.batch_size)]
        return full + tail

    def __iter__(self):
        return iter([i for batch in self.batches() for i in batch])
