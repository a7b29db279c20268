"""Alignment: ground truth and scores on the T x F grid.

In: maps ``(T, F)`` and audio, stems or class names. Out: mel features, instrument-band
templates, metrics (IoU, AP, correlations, pointing game) and tables with null baselines
and bootstrap confidence intervals. Plain arrays in and out; nothing from capture.
"""
