"""Datasets: Slakh2100 trees and the offline mini-Slakh renderer.

In: a Slakh2100-layout folder (or a seed for the renderer). Out: tracks with their mixture,
stems and instrument classes, as arrays; the renderer writes the same layout from generated
MIDI (``aiba make-dataset``).
"""
