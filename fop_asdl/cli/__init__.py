"""The experiment runner behind the ``fop-asdl`` command: configs, training runs, sweeps and reports.

It builds on the library (``fop_asdl.make_gradient_maker``, ``fop_asdl.data``, ``fop_asdl.models``); the
library never imports it.
"""

from .main import main

__all__ = ["main"]
