"""nvfp4_jax.progress: line output off a terminal, and an ETA that leaves out the first step."""
import io

from nvfp4_jax.progress import Progress


class _Clock:
    """Returns the given times in order: the start, then the end of each step."""

    def __init__(self, *times):
        self._times = iter(times)

    def __call__(self):
        return next(self._times)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


# start at 0; the first step (compilation included) ends at 100, later steps take 10, 20, 30 s
TIMES = (0.0, 100.0, 110.0, 130.0, 160.0)


def _run(stream, total=5, enabled=True):
    p = Progress(total, enabled, stream=stream, clock=_Clock(*TIMES))
    etas = []
    for i in range(len(TIMES) - 1):
        p.step(f"layer.{i}")
        etas.append(p.eta_s())
    return p, etas


def test_eta_is_the_mean_of_the_steps_after_the_first_times_the_steps_left():
    _, etas = _run(io.StringIO())
    # after step 2: mean 10 s, 3 left; step 3: mean (10 + 20) / 2, 2 left; step 4: mean 20, 1 left
    assert etas == [None, 30.0, 30.0, 20.0]


def test_eta_is_zero_when_done():
    p = Progress(2, True, stream=io.StringIO(), clock=_Clock(0.0, 50.0, 51.0))
    p.step("layer.0")
    p.step("non-layer")
    assert p.eta_s() == 0.0


def test_not_a_terminal_gives_one_plain_line_per_step():
    stream = io.StringIO()
    _run(stream)
    out = stream.getvalue()
    assert "\r" not in out
    assert out.splitlines() == [
        "[1/5] layer.0  elapsed 100.0s  eta ?",
        "[2/5] layer.1  elapsed 110.0s  eta 30.0s",
        "[3/5] layer.2  elapsed 130.0s  eta 30.0s",
        "[4/5] layer.3  elapsed 160.0s  eta 20.0s",
    ]
    assert out.endswith("\n")


def test_terminal_redraws_one_bar_and_ends_the_line_when_done():
    stream = _Terminal()
    p = Progress(4, True, stream=stream, clock=_Clock(*TIMES))
    for i in range(4):
        p.step(f"layer.{i}")
    out = stream.getvalue()
    assert "\r" in out and out.count("\n") == 1 and out.endswith("\n")
    frames = [f for f in out.rstrip("\n").split("\r") if f]
    assert "2/4 layer.1  elapsed 110.0s  eta 20.0s" in frames[2]  # frame 0 is the empty bar
    assert frames[-1].startswith("[" + "#" * 28 + "] 4/4 layer.3  elapsed 160.0s  eta 0.0s")


def test_disabled_writes_nothing_but_counts():
    stream = _Terminal()
    p, etas = _run(stream, enabled=False)
    assert stream.getvalue() == ""
    assert p.done == 4 and etas[-1] == 20.0


def test_closing_early_ends_the_bar_line_once():
    stream = _Terminal()
    with Progress(4, True, stream=stream, clock=_Clock(*TIMES)) as p:
        p.step("layer.0")
    p.close()
    out = stream.getvalue()
    assert out.endswith("\n") and out.count("\n") == 1
    assert "1/4 layer.0  elapsed 100.0s  eta ?" in out
