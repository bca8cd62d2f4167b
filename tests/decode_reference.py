"""The truth for decode tests: rows of L tokens from given states, with per-row lengths and per-token gates.

Built from lightning_attention.reference.recurrent_reference one token at a time (the library's one recurrence),
with that token's log decay g_gamma + g[n, t] as its per-head decay.
"""

import torch

from lightning_attention.reference import recurrent_reference


def decode_reference(q, k, v, states, g_gamma, scale, g=None, lengths=None):
    """q, k ``[N, L, H, K]``, v ``[N, L, H, V]``, states ``[N, H, K, V]`` (its dtype is the computation's: float64
    for the truth, float32 for a same-dtype baseline), g ``[N, L, H]`` or None, lengths ints ``[N]`` or None.

    Returns (o ``[N, L, H, V]``, zero past each row's length; states after each row's tokens ``[N, H, K, V]``)."""
    N, L, H = q.shape[:3]
    dtype = states.dtype
    o = torch.zeros(N, L, H, v.shape[-1], dtype=dtype)
    finals = []
    for n in range(N):
        state = states[n : n + 1]
        for t in range(L if lengths is None else int(lengths[n])):
            log_decay = g_gamma.to(dtype) + (0 if g is None else g[n, t].to(dtype))
            token = [x[n : n + 1, t : t + 1].to(dtype) for x in (q, k, v)]
            o_t, state = recurrent_reference(*token, log_decay, scale, state, True)
            o[n, t] = o_t[0, 0]
        finals.append(state[0])
    return o, torch.stack(finals)
