"""Shared test set-up: keep third-party libraries offline and quiet, and tests small."""

from __future__ import annotations

import os

# Before any test imports albumentations/ultralytics: no update checks, no downloads.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
# Two cores in CI: keep each test's BLAS/torch threads bounded.
os.environ.setdefault("OMP_NUM_THREADS", "2")
