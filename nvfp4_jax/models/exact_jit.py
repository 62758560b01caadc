"""jax.jit for the model forwards, compiled so that every low-precision rounding happens.

XLA may keep the float32 value of a bf16 elementwise result inside a fusion instead of rounding
it to bf16 ("excess precision", on by default on CPU and GPU): a residual add, an activation times
up-projection or a RoPE product then carries more precision than the same op in torch, which
rounds after every op. Calibration amaxes must be those of the model as transformers runs it
(ModelOpt calibrates the torch model), so the model's jitted functions compile with excess
precision off. On the tiny DeepSeek-V3 golden (tests/test_golden_deepseek.py), with MLA attention
already rounded as torch does, this moved the largest input_scale difference to ModelOpt from 4.9%
to 0 and the share of layer-output elements differing from transformers from 56% to 0. float32
forwards are unaffected.
"""

from __future__ import annotations

import functools

import jax

EXACT_ROUNDING = {"xla_allow_excess_precision": False}


def exact_jit(fn, **jit_kwargs):
    """jax.jit(fn, **jit_kwargs) compiled with EXACT_ROUNDING when called at the top level.

    JAX accepts compiler options only on a top-level jit, so a call traced inside another jit
    (``nnx.jit(model)``, the sharded forward) runs the plain jit and gets the outer program's
    options: the sharded forward's own exact_jit gives it EXACT_ROUNDING; a user's ``nnx.jit``
    keeps XLA's default (excess precision allowed).
    """
    exact = jax.jit(fn, compiler_options=EXACT_ROUNDING, **jit_kwargs)
    nested = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        return (nested if traced else exact)(*args, **kwargs)

    call.lower = exact.lower  # ahead-of-time compilation and memory analysis see the top-level program
    return call
