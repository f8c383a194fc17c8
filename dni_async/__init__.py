"""dni_async: asynchronous layer-parallel training with Decoupled Neural Interfaces."""

from .interface import DNI
from .recurrent import TruncatedLSTM
from .synthetic import (
    RNNDNI,
    Conv2dDNI,
    DNINetwork,
    LinearBatchNormDNI,
    LinearDNI,
    LinearSigmoidDNI,
    LowRankDNI,
    SoftmaxDNI,
)

__all__ = ["DNI", "DNINetwork", "LinearDNI", "LowRankDNI", "LinearSigmoidDNI", "LinearBatchNormDNI", "Conv2dDNI",
           "RNNDNI", "SoftmaxDNI", "TruncatedLSTM"]
__version__ = "0.1.0"
