"""breastfusion: Ray-distributed search and cross-validation for DM + US breast lesion models.

Importing this package must stay light: no torch, ray, ultralytics or pytorch_grad_cam at
import time (the CLI starts in well under a second). Heavy imports live inside the modules
that need them (CONTRIBUTING.md lists where each may live).
"""

__version__ = "0.1.0"
