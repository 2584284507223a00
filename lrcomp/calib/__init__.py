"""Calibration statistics: streaming covariance of layer inputs and output gradients, per-layer statistics."""

from lrcomp.calib.calibrate import calibrate
from lrcomp.calib.covariance import CovarianceAccumulator
from lrcomp.calib.stats import GRADIENT_STATS, STAT_NAMES, CalibrationStats

__all__ = ["GRADIENT_STATS", "STAT_NAMES", "CalibrationStats", "CovarianceAccumulator", "calibrate"]
