"""Tooling around the recipe, run as modules from the repository root (`python -m tools.plan --trace`, `python -m
tools.bench --roofline`): the memory plan and its fake-tensor trace, speed measurements, the computed roofline.
The recipe never imports this package."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: tiny_configs/, tests/
