"""Custom accelerator kernels."""
