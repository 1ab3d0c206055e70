"""Experiment entry point (`python -m experiments.run`) and named configs."""
