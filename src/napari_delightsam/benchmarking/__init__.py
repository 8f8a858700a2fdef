"""Tooling, not the product: speed and accuracy comparisons with the models a user would pick
instead (``delightsam benchmark``, ``benchmarks/*.py``).

speed.py      speed, memory, parameters and FLOPs next to SAM ViT-B and LiteMedSAM
baselines.py  the accuracy baselines (LiteMedSAM with boxes, Otsu, an untrained model)
"""
