"""Triton kernels of flexkd-ds, installed as ``flexkd_ds.kernels``."""
