"""Make ``breastfusion`` importable from a `ray job submit --working-dir .` upload.

On a cluster the package is installed on every node (cluster.yaml's setup_commands); this
fallback puts the uploaded ``platform/`` source root first on sys.path so that the job runs
the code that was submitted with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1] / "platform"
if SOURCE_ROOT.is_dir() and str(SOURCE_ROOT) not in sys.path:
    sys.path.insert(0, str(SOURCE_ROOT))
