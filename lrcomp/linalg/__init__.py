"""Linear algebra for compression: randomized SVD, batched over layers of one shape."""

from lrcomp.linalg.rsvd import rsvd

__all__ = ["rsvd"]
