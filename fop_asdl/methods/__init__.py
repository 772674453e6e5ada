"""One file per method (a small class the engine calls), its pure math beside it in <method>_math.py."""
