"""Datasets: Slakh2100 trees and the offline mini-Slakh renderer."""
