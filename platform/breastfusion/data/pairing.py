"""Per-epoch pair sampling: an epoch's cost grows with patients, not with their image pairs.

The study pairs every US image of a patient with every DM image, so a patient with 4 DM and
3 US images contributes 12 pairs to every epoch while a 1 × 1 patient contributes one: epoch
time is driven by the few image-rich patients, and those patients weigh 12 times more in the
loss. With ``data.pairs_per_patient = N`` each patient fills ``m = min(N, k)`` *slots* per
epoch (``k``: its number of pairs), and ``PairSchedule`` decides which pairs fill them:

* Slots are fixed: slot ``j`` always belongs to the same patient, so the dataset length and
  every slot's label are the same in every epoch. Oversampling weights (``sampler``) and
  replicated indices (``replicate``), computed once from the slot labels, stay valid after
  each resampling, and DataLoader/DistributedSampler lengths never change.
* Cycling: a patient's pairs are shuffled once per *cycle* of ``ceil(k / m)`` epochs and dealt
  out ``m`` at a time, so every pair is used at least once per cycle and an epoch never holds
  the same pair twice (a short last deal is topped up from the start of the same shuffle).
  Each cycle gets a new shuffle, so consecutive cycles do not repeat the same grouping.
* Determinism: the shuffle of a cycle is a function of (seed, patient id, cycle) only, so an
  epoch's pairs depend on nothing but the seed and the epoch number (a resumed run at epoch
  ``e`` draws what an uninterrupted one would, and a patient's draws do not depend on which
  other patients share its fold).

Evaluation never samples: a patient's score averages all of its pairs (``make_loader``
refuses a sampled dataset with ``train=False``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


class PairSchedule:
    """Which pair fills each slot in an epoch.

    ``counts[i]``: number of pairs of patient ``i``, whose pairs are the contiguous block
    ``starts[i] .. starts[i] + counts[i]`` of the full pair list. ``patient_ids`` seed each
    patient's shuffles. ``per_patient=None`` means every pair in every epoch.
    """

    def __init__(
        self,
        counts: Sequence[int],
        patient_ids: Sequence[str],
        per_patient: int | None,
        seed: int = 0,
    ):
        if per_patient is not None and (isinstance(per_patient, bool) or int(per_patient) < 1):
            raise ValueError(f"pairs_per_patient must be ≥ 1 or None, got {per_patient!r}")
        self.counts = np.asarray(counts, dtype=np.int64)
        if len(self.counts) != len(patient_ids) or (self.counts < 1).any():
            raise ValueError("every patient needs at least one pair and an id")
        self.patient_ids = [str(p) for p in patient_ids]
        self.per_patient = None if per_patient is None else int(per_patient)
        self.seed = int(seed)
        self.starts = np.cumsum(self.counts) - self.counts
        cap = self.counts if self.per_patient is None else np.minimum(self.counts, per_patient)
        self.slots_per_patient = cap
        self.slot_patient = np.repeat(np.arange(len(self.counts)), cap)

    @property
    def n_slots(self) -> int:
        return int(self.slots_per_patient.sum())

    @property
    def n_pairs(self) -> int:
        return int(self.counts.sum())

    def cycle_epochs(self) -> int:
        """Epochs after which every pair of every patient has been used at least once."""
        return int(np.max(-(-self.counts // self.slots_per_patient), initial=1))

    def _shuffle(self, i: int, cycle: int) -> np.ndarray:
        key = zlib.crc32(self.patient_ids[i].encode("utf-8"))
        rng = np.random.default_rng([self.seed % 2**63, key, cycle])
        return rng.permutation(int(self.counts[i]))

    def pairs_for_epoch(self, epoch: int) -> np.ndarray:
        """Index into the full pair list for every slot of ``epoch`` (any integer ≥ 0)."""
        if epoch < 0:
            raise ValueError(f"epoch must be ≥ 0, got {epoch}")
        out = np.empty(self.n_slots, dtype=np.int64)
        pos = 0
        for i, (k, m) in enumerate(zip(self.counts, self.slots_per_patient, strict=True)):
            k, m = int(k), int(m)
            if m == k:  # every pair fits: no choice to make (the loader shuffles the order)
                picked = np.arange(k)
            else:
                per_cycle = -(-k // m)
                cycle, deal = divmod(int(epoch), per_cycle)
                order = self._shuffle(i, cycle)
                picked = order[deal * m : deal * m + m]
                if len(picked) < m:  # short last deal: top up from the same shuffle's start
                    picked = np.concatenate([picked, order[: m - len(picked)]])
            out[pos : pos + m] = self.starts[i] + picked
            pos += m
        return out
