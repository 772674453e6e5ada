"""``python -m fop_asdl``: the ``fop-asdl`` command line."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
