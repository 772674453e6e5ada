"""FOP (Fisher-Orthogonal Projection) natural gradient for ASDL.

``FOPGradientMaker`` is a drop-in replacement for ``asdl.KfacGradientMaker``; ``make_gradient_maker``
builds FOP, K-FAC, FNGD, HyLo or SGD by name. Importing the package applies the ASDL 0.1a5 fixes in
``compat``.
"""
from .curvature.asdl_kfac import KfacGradientMaker
from .methods.fngd import FNGDGradientMaker
from .methods.fop import FOPGradientMaker
from .methods.hylo import HyLoGradientMaker
from .methods.kfac import ScalableKfacGradientMaker
from .engine.sub_batches import average_and_difference
from .methods.fop_math import FOPCoefficients, FOPOptions, fop_coefficients
from .registry import GRADIENT_MAKERS, make_gradient_maker

__all__ = [
    "FOPGradientMaker", "FNGDGradientMaker", "HyLoGradientMaker", "KfacGradientMaker", "ScalableKfacGradientMaker",
    "make_gradient_maker", "GRADIENT_MAKERS",
    "FOPOptions", "FOPCoefficients", "fop_coefficients", "average_and_difference",
]
__version__ = "0.1.0"
