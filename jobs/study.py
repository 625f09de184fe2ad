"""Ray job: the whole study (data → splits → ROI → searches → aggregation → final → report).

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/study.py --config jobs/study.yaml --out /shared/studies/chen2025

Options: ``--config STUDY.yaml`` (required), ``--out DIR``, ``--resume``, ``--debug``
(the same stages in minutes: fold 0, <= 2 trials per search, 1 epoch).
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401  (puts the uploaded source first on sys.path)

from breastfusion.cli import main


def _args(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="study YAML (e.g. jobs/study.yaml)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--debug", action="store_true")
    ns = parser.parse_args(argv)
    args = ["run", ns.config]
    if ns.out:
        args += ["--out", ns.out]
    args += ["--resume"] * ns.resume + ["--debug"] * ns.debug
    return args


if __name__ == "__main__":
    sys.exit(main(_args(sys.argv[1:])))
