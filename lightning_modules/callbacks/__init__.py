"""Callbacks the module adds by default: validation previews, test metric tables, prediction files."""

from lightning_modules.callbacks.metric_tables import MetricTableWriter
from lightning_modules.callbacks.prediction_writer import PredictionWriter
from lightning_modules.callbacks.previews import PredictionPreviews

__all__ = ["MetricTableWriter", "PredictionPreviews", "PredictionWriter"]
