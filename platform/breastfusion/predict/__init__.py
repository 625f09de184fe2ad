"""``breastfusion predict``: score patients with a bundle exported by ``breastfusion final``.

``inputs`` (manifest or image folder), ``images`` (reading, the bundle's ROI step),
``run`` (scoring, fallbacks, per-patient status), ``writing`` (outputs), ``cli``.
"""
