"""Joint fine-tune-and-compress methods (ACIP, PC-LoRA, TuneComp, JACTUS, LPAF) and their driver."""

from lrcomp.compression.config import JOINT_METHODS
from lrcomp.methods.base import JointMethod
from lrcomp.methods.compressor import Compressor, method_class

__all__ = ["JOINT_METHODS", "Compressor", "JointMethod", "method_class"]
