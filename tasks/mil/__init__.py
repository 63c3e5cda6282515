"""Whole-slide multiple-instance learning (MIL) on frozen patch features: ABMIL, ACMIL and a mean-pooling baseline."""
