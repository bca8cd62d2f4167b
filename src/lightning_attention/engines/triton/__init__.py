"""Triton kernels (GPU; on CPU under TRITON_INTERPRET=1). See interface.py for the engines they form."""
