"""Prefect flows. `python flows/full.py --help` runs the whole pipeline."""
