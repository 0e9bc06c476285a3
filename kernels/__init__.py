"""Device code of symmtriton (Triton JIT functions only), importable as ``symmtriton.kernels``."""
