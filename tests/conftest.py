"""Shared test set-up: keep third-party libraries offline and quiet, and tests small."""

from __future__ import annotations

import os
import signal

# Before any test imports albumentations/ultralytics: no update checks, no downloads.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
# Two cores in CI: keep each test's BLAS/torch threads bounded.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# A shell that starts the suite in the background (`make test &`, nohup) hands it SIGINT
# ignored, and every child inherits that: the interrupt tests would send SIGINT into the
# void and time out. The tests need Python's own Ctrl-C handling, here and in children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --- synthetic cohort shared by many tests (owned by data/synthetic.py) ---
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic paired cohort (40 patients, 64 px, seed 0), built once per session.

    Returns the Path of its ``manifest.csv``. It has 10 malignant patients (enough for 5
    folds plus a 20 % holdout), DICOM, 16-bit and RGB files, and a few single-modality
    patients. Treat it as read-only: copy it before changing anything.
    """
    from breastfusion.data.synthetic import generate_cohort

    return generate_cohort(
        tmp_path_factory.mktemp("synthetic_cohort"), n_patients=40, seed=0, size=64, workers=1
    )
