"""The training-time watch: schedule, measurement, sinks (:class:`ESSWatch`)."""

from .measure import METRICS, STATS, MeasureConfig, aggregate_model, measure_operator, select_indices
from .schedule import Schedule
from .sinks import CallableSink, Sink, TensorBoardSink
from .watch import ESSMeasurementError, ESSWarning, ESSWatch

__all__ = [
    "ESSWatch",
    "ESSWarning",
    "ESSMeasurementError",
    "Schedule",
    "MeasureConfig",
    "measure_operator",
    "aggregate_model",
    "select_indices",
    "Sink",
    "CallableSink",
    "TensorBoardSink",
    "METRICS",
    "STATS",
]
