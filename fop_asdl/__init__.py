"""FOP (Fisher-Orthogonal Projection) natural gradient for ASDL.

``FOPGradientMaker`` is a drop-in replacement for ``asdl.KfacGradientMaker``; ``make_gradient_maker``
builds FOP, K-FAC, FNGD, HyLo or SGD by name. Importing the package applies the ASDL 0.1a5 fixes in
``compat``.
"""
from .compat import KfacGradientMaker
from .fngd import FNGDGradientMaker
from .fop import FOPGradientMaker
from .hylo import HyLoGradientMaker
from .kfac import ScalableKfacGradientMaker
from .projection import FOPCoefficients, FOPOptions, average_and_difference, fop_coefficients
from .registry import GRADIENT_MAKERS, make_gradient_maker

__all__ = [
    "FOPGradientMaker", "FNGDGradientMaker", "HyLoGradientMaker", "KfacGradientMaker", "ScalableKfacGradientMaker",
    "make_gradient_maker", "GRADIENT_MAKERS",
    "FOPOptions", "FOPCoefficients", "fop_coefficients", "average_and_difference",
]
__version__ = "0.1.0"
