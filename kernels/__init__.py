"""transrec.kernels."""
