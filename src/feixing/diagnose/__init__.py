"""The doctor for slow runs: per-rank telemetry, detectors, fault injection and the `feixing doctor` report."""

from feixing.diagnose.detect import Finding
from feixing.diagnose.telemetry import Telemetry

__all__ = ["Finding", "Telemetry"]
