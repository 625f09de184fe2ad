"""Training-only augmentation (albumentations) and malignant oversampling.

Both exist to enlarge and balance the training folds, as in the study (flips and elastic
deformation used to enlarge the malignant class). They are applied to training data only:
validation/holdout datasets get neither, otherwise metrics would be computed on synthetic
variants and oversampled duplicates. ``datasets.make_loader`` enforces this.

Seeding story (why a CPU run is repeatable):

* An ``Augmenter`` owns its random stream (``albumentations.Compose(seed=...)``); it never
  touches the global numpy/random state, so model init and the sampler are unaffected by it.
* In the main process (``num_workers=0``) ``make_loader`` reseeds the augmenters from the
  loader seed, so two runs with the same seed see the same augmentations, and successive epochs
  continue the stream (different augmentations per epoch).
* In DataLoader workers, ``seed_worker`` reseeds every augmenter of the worker's dataset copy from
  ``torch.utils.data.get_worker_info().seed`` (= base seed drawn from the loader's seeded
  generator + worker id). So workers never share a stream (without this, every worker would
  replay the same augmentations), each epoch of non-persistent workers gets fresh seeds, and
  persistent workers continue their streams; all of it is a function of the loader seed because
  the assignment of batches to workers is deterministic.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from breastfusion.errors import ConfigError

if TYPE_CHECKING:  # keep torch out of import time for light importers
    from torch.utils.data import Sampler

log = logging.getLogger(__name__)

OversampleMode = Literal["none", "sampler", "replicate"]
OVERSAMPLE_MODES = ("none", "sampler", "replicate")

# Elastic deformation at strength 1: an RMS displacement of 2% of the image side, smooth over
# ~5% of the side. Both are fractions of the side so that 64 px and 1024 px images deform alike.
_ELASTIC_RMS_FRAC = 0.02
_ELASTIC_SIGMA_FRAC = 0.05


@dataclass(frozen=True)
class AugmentSpec:
    """Probabilities of each augmentation and the elastic strength.

    ``hflip`` and ``vflip`` are drawn independently, so "both" occurs with probability
    ``hflip * vflip`` (0.25 at the defaults: none / horizontal / vertical / both equally often,
    the study's four flip variants). ``elastic`` is the probability of an elastic deformation;
    ``strength`` scales its displacement (the "alpha": RMS displacement = 2% of the image side
    × strength); the smoothness ("sigma", 5% of the side) is not scaled, because scaling it
    changes the shape of the deformation rather than its amount.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    elastic: float = 0.0
    strength: float = 1.0

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip", "elastic"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
                raise ConfigError(f"augmentation probability {name} must be in [0, 1], got {p!r}")
        if not isinstance(self.strength, (int, float)) or self.strength < 0:
            raise ConfigError(
                f"augmentation strength must be a non-negative number, got {self.strength!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.hflip > 0 or self.vflip > 0 or (self.elastic > 0 and self.strength > 0)

    def to_dict(self) -> dict[str, float]:
        return {
            "hflip": float(self.hflip),
            "vflip": float(self.vflip),
            "elastic": float(self.elastic),
            "strength": float(self.strength),
        }


class Augmenter:
    """A seeded albumentations pipeline on uint8 H×W grey images (returns uint8 H×W).

    ``size`` is the side of the (square) images it will see; the elastic parameters are
    derived from it so that a strength means the same at every input size.
    """

    def __init__(self, spec: AugmentSpec, size: int, seed: int = 0):
        import albumentations as A

        self.spec = spec
        self.size = int(size)
        transforms: list[Any] = []
        if spec.hflip > 0:
            transforms.append(A.HorizontalFlip(p=spec.hflip))
        if spec.vflip > 0:
            transforms.append(A.VerticalFlip(p=spec.vflip))
        if spec.elastic > 0 and spec.strength > 0:
            transforms.append(
                _smooth_elastic_class()(
                    rms=spec.strength * _ELASTIC_RMS_FRAC * self.size,
                    sigma=max(1.0, _ELASTIC_SIGMA_FRAC * self.size),
                    p=spec.elastic,
                )
            )
        self._compose = A.Compose(transforms)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the random streams (see the module docstring for when this happens).

        albumentations 2.0.8's ``Compose(seed=s)`` gives every transform the *same* stream, so
        two flips with equal p would always fire together (only "none" and "both", never one
        flip alone). Each transform therefore gets its own child seed.
        """
        seq = np.random.SeedSequence(int(seed) % 2**32)
        self._compose.set_random_seed(int(seq.generate_state(1)[0]))
        for t, child in zip(
            self._compose.transforms, seq.spawn(len(self._compose.transforms)), strict=True
        ):
            t.set_random_seed(int(child.generate_state(1)[0]))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"Augmenter expects uint8 H×W, got {image.dtype} {image.shape}")
        out = self._compose(image=image)["image"]
        if out.ndim == 3:  # some transforms return H×W×1
            out = out[..., 0]
        return np.ascontiguousarray(out)

    def __repr__(self) -> str:
        return f"Augmenter({self.spec}, size={self.size})"


_SMOOTH_ELASTIC: type | None = None


def _smooth_elastic_class() -> type:
    """``SmoothElastic``: elastic deformation with its displacement field built on a coarse grid.

    Why not ``A.ElasticTransform``: it blurs full-resolution noise with a Gaussian whose kernel
    grows with sigma, so its cost grows ~size³ (measured, 1 thread: 4 ms at 224 px, 63 ms at
    512, 745 ms at 1024 — the data pipeline would dwarf the model). The field is smooth at the
    scale of sigma anyway, so drawing it on a grid with ~sigma/2 spacing, blurring there and
    upsampling bilinearly gives the same kind of deformation in O(size²) (≈0.5 ms at 224 px).
    The field is normalised to a fixed RMS so ``strength`` means the same for every draw.
    Built lazily so that importing this module does not import albumentations.
    """
    global _SMOOTH_ELASTIC
    if _SMOOTH_ELASTIC is not None:
        return _SMOOTH_ELASTIC
    import albumentations as A
    import cv2

    class SmoothElastic(A.ImageOnlyTransform):
        class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
            rms: float
            sigma: float

        def __init__(self, rms: float, sigma: float, p: float = 0.5):
            super().__init__(p=p)
            self.rms = float(rms)
            self.sigma = float(sigma)

        def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
            h, w = params["shape"][:2]
            step = max(1, int(self.sigma // 2))
            # One spare cell before and two after each axis keep the cropped region away from
            # the clamped borders of the upsampling, where the interpolation stops being linear.
            ch, cw = h // step + 3, w // step + 3
            field = self.random_generator.standard_normal((2, ch, cw), dtype=np.float32)
            for k in range(2):
                cv2.GaussianBlur(
                    field[k], (0, 0), self.sigma / step, dst=field[k], borderType=cv2.BORDER_REFLECT
                )
            field *= self.rms / max(float(np.sqrt((field**2).mean())), 1e-6)
            # Add the identity at coarse resolution (full-res coordinate of each coarse cell
            # centre, shifted by one cell): bilinear upsampling of a linear ramp is exact, so the
            # absolute sampling maps come out of one resize each, with no full-size grid.
            centres = np.float32(step) * (np.arange(max(ch, cw), dtype=np.float32) - 0.5) - 0.5
            field[0] += centres[None, :cw]
            field[1] += centres[:ch, None]
            size = (cw * step, ch * step)
            crop = (slice(step, step + h), slice(step, step + w))
            map_x = cv2.resize(field[0], size, interpolation=cv2.INTER_LINEAR)[crop]
            map_y = cv2.resize(field[1], size, interpolation=cv2.INTER_LINEAR)[crop]
            return {"map_x": map_x, "map_y": map_y}

        def apply(self, img: np.ndarray, map_x=None, map_y=None, **params: Any) -> np.ndarray:
            return cv2.remap(
                img,
                map_x,
                map_y,
                interpolation=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )

        def get_transform_init_args_names(self) -> tuple[str, ...]:
            return ("rms", "sigma")

    # Pickle finds the class as ``breastfusion.data.augment.SmoothElastic`` through the module
    # ``__getattr__`` below, so augmenters survive spawn-started DataLoader workers (macOS).
    SmoothElastic.__qualname__ = "SmoothElastic"
    SmoothElastic.__module__ = __name__
    _SMOOTH_ELASTIC = SmoothElastic
    return SmoothElastic


def __getattr__(name: str) -> Any:
    if name == "SmoothElastic":
        return _smooth_elastic_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_augmenter(spec: AugmentSpec | None, size: int, seed: int = 0) -> Augmenter | None:
    """An ``Augmenter``, or None when ``spec`` is None or turns nothing on."""
    if spec is None or not spec.enabled:
        return None
    return Augmenter(spec, size, seed)


# --------------------------------------------------------------------------------------------
# Oversampling (training folds only)
# --------------------------------------------------------------------------------------------


def _check_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels, dtype=np.int64)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be a 1-D sequence of 0/1")
    return y


def balanced_sampler(labels: Sequence[int] | np.ndarray, seed: int = 0) -> Sampler[int]:
    """A WeightedRandomSampler drawing both classes equally often (with replacement).

    ``num_samples = len(labels)``, so an epoch keeps its length; the generator is seeded so the
    draw order is repeatable.
    """
    import torch
    from torch.utils.data import WeightedRandomSampler

    y = _check_labels(labels)
    counts = np.bincount(y, minlength=2).astype(np.float64)
    if (counts == 0).any():
        log.warning("oversampling: only one class in the training set; sampling uniformly")
        weights = np.ones(len(y), dtype=np.float64)
    else:
        weights = (1.0 / counts)[y]
    gen = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),
        num_samples=len(y),
        replacement=True,
        generator=gen,
    )


def replicate_indices(labels: Sequence[int] | np.ndarray, seed: int = 0) -> list[int]:
    """Sample indices with the minority class (malignant, in practice) replicated to balance.

    Every minority sample appears ``majority // minority`` times; the remainder is drawn without
    replacement (seeded), so replication is as even as possible. The loader shuffles the list.
    """
    y = _check_labels(labels)
    idx = np.arange(len(y))
    counts = np.bincount(y, minlength=2)
    if (counts == 0).any() or counts[0] == counts[1]:
        return idx.tolist()
    minority = int(np.argmin(counts))
    m_idx = idx[y == minority]
    deficit = int(counts.max() - counts.min())
    extra = np.repeat(m_idx, deficit // len(m_idx))
    rest = deficit - len(extra)
    if rest:
        rng = np.random.default_rng(int(seed))
        extra = np.concatenate([extra, rng.choice(m_idx, size=rest, replace=False)])
    return np.concatenate([idx, np.sort(extra)]).tolist()


def oversampling(
    labels: Sequence[int] | np.ndarray, mode: OversampleMode, seed: int = 0
) -> tuple[Sampler[int] | None, list[int] | None]:
    """``(sampler, indices)`` for a mode: sampler → (sampler, None), replicate → (None, indices),
    none → (None, None)."""
    if mode == "none":
        return None, None
    if mode == "sampler":
        return balanced_sampler(labels, seed), None
    if mode == "replicate":
        return None, replicate_indices(labels, seed)
    raise ConfigError(f"oversampling must be one of {list(OVERSAMPLE_MODES)}, got {mode!r}")


# --------------------------------------------------------------------------------------------
# Worker seeding
# --------------------------------------------------------------------------------------------


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive every random stream of the worker from its seed."""
    import torch

    info = torch.utils.data.get_worker_info()
    seed = info.seed if info is not None else torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    ds = info.dataset if info is not None else None
    # Unwrap Subset/ConcatDataset-style wrappers (replication uses a Subset).
    while ds is not None and not hasattr(ds, "reseed") and hasattr(ds, "dataset"):
        ds = ds.dataset
    if ds is not None and hasattr(ds, "reseed"):
        ds.reseed(seed)
