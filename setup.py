"""Build script for lrcomp.

Metadata lives in pyproject.toml. This file exists for the compiled part: the CUDA
extension ``lrcomp._C`` built from csrc/ (randomized SVD, covariance accumulation) when a
CUDA build of torch and nvcc are present. Until csrc/ holds sources, and on any machine
without CUDA, the install is pure Python and ``import lrcomp`` works all the same.
"""

from setuptools import setup

setup()
