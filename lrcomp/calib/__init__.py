"""Calibration statistics: streaming covariance of layer inputs and output gradients."""

from lrcomp.calib.covariance import CovarianceAccumulator

__all__ = ["CovarianceAccumulator"]
