"""Small-scale ablations of the paper's claims, on real images, within minutes per run on one CPU core.

    python -m experiments.run --all [--out runs/ablations] [--smoke]
    python -m experiments.run tok-k10 tok-k18 ar-intra2 ...

Presets (``experiments.presets``), results and plots: ``docs/ablations.md``.
"""
