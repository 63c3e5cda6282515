"""Prefect flows: parameters, fan-out over shards, artifacts. No image or model code."""
