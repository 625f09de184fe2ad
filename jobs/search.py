"""Ray job: a hyperparameter search over patient-level folds.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/search.py --space search_spaces/fusion.yaml \
        --manifest /data/cohort/manifest.csv --splits /data/cohort/splits.json --out /data/runs/fusion

Same options as ``breastfusion search`` (``--debug``: fold 0, <= 2 trials, 1 epoch, few patients).
"""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401  (puts the uploaded source first on sys.path)

from breastfusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
