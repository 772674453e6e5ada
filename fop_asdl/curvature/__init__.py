"""Kronecker curvature on ASDL's stored matrices: the Fisher pass inside the step, products, inverses, ASDL's K-FAC with its fixes."""
