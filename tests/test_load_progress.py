"""flashlite.load(..., progress=callback): the load's progress as fractions, for a UI's progress bar."""
import threading

import pytest

import flashlite


def test_progress_goes_from_zero_to_one_on_the_loading_thread(tiny_gguf):
    seen, threads = [], set()

    def progress(fraction):
        seen.append(fraction)
        threads.add(threading.get_ident())

    model = flashlite.load(tiny_gguf(), progress=progress)
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert 3 <= len(seen) <= 110
    assert threads == {threading.get_ident()}
    assert model.forward([1, 2, 3]).shape[0] == 3
    assert model.file.load.__func__ is type(model.file).load  # the counting wrapper is gone after the load


def test_a_failing_progress_callback_fails_the_load(tiny_gguf):
    def progress(fraction):
        if fraction > 0.5:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        flashlite.load(tiny_gguf(), progress=progress)
