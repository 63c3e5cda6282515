"""Whole-slide multiple-instance learning (MIL) on frozen patch features: task files (tasks.py) and the ABMIL, ACMIL
and mean-pooling models (models.py)."""
