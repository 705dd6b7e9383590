"""Plain-PyTorch reference implementations: short, float64, the test oracle.

Every op has one file here with the same name as its kernels
(csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu, kernels/<op>.py).
"""
