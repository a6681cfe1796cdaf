"""Tracking: the sink interface, the MLflow transport, image grids, and the EMA weights as an MLflow model."""
