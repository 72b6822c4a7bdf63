"""spcompile.timing: on a GPU, a kernel of known length is timed at that length, and the rounds
of ``interleaved_ms`` keep their order and count (skipped without CUDA); anywhere, the order in
which its rounds time the functions."""

import pytest
import torch

from spcompile import timing
from spcompile.timing import interleaved_ms, median_ms

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sleep_ms(cycles: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


@needs_cuda
def test_median_ms_times_a_kernel_of_known_length():
    cycles = 20_000_000  # ~10 ms at the H100's clock
    expected = min(_sleep_ms(cycles) for _ in range(3))
    got = median_ms(lambda: torch.cuda._sleep(cycles), min_reps=5)
    assert 0.9 * expected < got < 1.2 * expected


@needs_cuda
def test_interleaved_ms_rounds():
    rounds = interleaved_ms({"short": lambda: torch.cuda._sleep(1_000_000),
                             "long": lambda: torch.cuda._sleep(4_000_000)}, rounds=2)
    assert list(rounds) == ["short", "long"]
    assert all(len(v) == 2 for v in rounds.values())
    assert min(rounds["long"]) > 2 * max(rounds["short"])


def test_interleaved_ms_rotates_the_order_of_its_rounds(monkeypatch):
    timed: list[str] = []
    monkeypatch.setattr(timing, "median_ms", lambda fn, min_reps: fn())
    fns = {name: (lambda name=name: timed.append(name) or 1.0) for name in "abcdef"}
    rounds = interleaved_ms(fns, rotate=True)
    assert timed == list("abcdef" "cdefab" "efabcd")
    assert list(rounds) == list("abcdef") and all(v == [1.0] * 3 for v in rounds.values())
    timed.clear()
    interleaved_ms(fns)
    assert timed == list("abcdef") * 3
