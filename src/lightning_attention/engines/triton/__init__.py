"""Triton kernels (GPU; on CPU under TRITON_INTERPRET=1). The engines they form: chunk.ENGINE and
recurrent.ENGINE (engines.get_engine); the serving kernels: decode.py."""
