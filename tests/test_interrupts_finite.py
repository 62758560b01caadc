"""SIGTERM/SIGINT become one exception; non-finite values are named with their first index."""

import os
import signal
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from nvfp4_jax.finite import NonFiniteError, check_finite
from nvfp4_jax.interrupts import Interrupted, raise_pending, signals_raise


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_raises_interrupted_and_restores_the_handler(sig):
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as e:
        with signals_raise():
            os.kill(os.getpid(), sig)
            for _ in range(10_000_000):  # the handler runs between bytecodes
                pass
    assert e.value.signum == sig and e.value.exit_code == 128 + sig
    assert signal.getsignal(sig) is before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_swallowed_signal_is_raised_at_the_next_safe_point(sig):
    """Library code that catches every exception (JAX's compilation cache read does) must not
    make the run forget the signal."""
    with pytest.raises(Interrupted) as e:
        with signals_raise():
            try:
                os.kill(os.getpid(), sig)
                for _ in range(10_000_000):
                    pass
            except Exception:  # what such a library does
                pass
            raise_pending()
    assert e.value.signum == sig
    raise_pending()  # after the block (the API's convert() outside any block): nothing on record
    with signals_raise():
        raise_pending()  # a new block starts with no signal on record


class _SignalsWhenCollected:
    """Sends a signal from its __del__, where an exception cannot propagate: the place a signal
    lands when it arrives during a garbage-collector callback (JAX registers one)."""

    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)
        for _ in range(10_000_000):
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_a_destructor_is_not_reported_and_is_raised_later(sig, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    with pytest.raises(Interrupted) as e:
        with signals_raise():
            obj = _SignalsWhenCollected(sig)
            del obj  # the Interrupted raised inside __del__ goes to sys.unraisablehook
            raise_pending()
    assert e.value.signum == sig
    assert reported == []  # would be printed as "Exception ignored ... Traceback"
    assert sys.unraisablehook == reported.append  # the previous hook is back


def test_other_unraisable_exceptions_still_reach_the_previous_hook(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    class Broken:
        def __del__(self):
            raise ValueError("a real bug in a destructor")

    with signals_raise():
        obj = Broken()
        del obj
    assert [type(u.exc_value) for u in reported] == [ValueError]


def test_finite_tensors_pass_and_integers_are_ignored():
    check_finite({"a": jnp.ones((4, 4), jnp.bfloat16), "ids": jnp.arange(3), "s": jnp.float32(2.0)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_first_non_finite_value_is_named(bad):
    w = np.ones((3, 5), np.float32)
    w[2, 1] = bad
    w[2, 4] = np.nan
    with pytest.raises(NonFiniteError) as e:
        check_finite({"model.norm.weight": jnp.asarray(w, jnp.bfloat16), "z.ok": jnp.zeros(2)}, "layer 3")
    msg = str(e.value)
    assert "model.norm.weight of layer 3" in msg and "[2, 1]" in msg and str(float(bad)) in msg


def test_scalar_non_finite():
    with pytest.raises(NonFiniteError, match=r"holds nan at index \[\]"):
        check_finite({"bias": jnp.float32(np.nan)})
