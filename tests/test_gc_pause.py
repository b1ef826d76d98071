"""gc_paused: overlapping holders (parses on several worker threads) leave the collector
as the first of them found it."""

from __future__ import annotations

import gc
import threading

import pytest

from common.gc_pause import gc_paused


@pytest.mark.parametrize("initially", [True, False])
def test_overlapping_holders_restore_the_collector_when_the_last_one_leaves(
    initially: bool,
) -> None:
    (gc.enable if initially else gc.disable)()
    try:
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        seen: list[bool] = []

        def first() -> None:
            with gc_paused():
                first_in.set()
                second_in.wait(5)
            first_out.set()

        def second() -> None:
            first_in.wait(5)
            with gc_paused():
                second_in.set()
                first_out.wait(5)
                seen.append(gc.isenabled())  # the first left, this one still holds

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert seen == [False]
        assert gc.isenabled() is initially
    finally:
        gc.enable()


def test_an_error_inside_still_restores_the_collector() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("parse failed")
    assert gc.isenabled()
