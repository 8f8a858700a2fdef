"""The widgets' garbage-collection policy (``widgets.gc_policy``): what it freezes, and that a
frozen object is collected once it is given up (no napari viewer needed here; the widget's own
use is tested in test_napari_segment.py)."""

from __future__ import annotations

import gc
import weakref

import pytest

from napari_delightsam.widgets import gc_policy


class _Cycle:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def _unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_freeze_long_lived_freezes_what_is_alive_unless_switched_off(monkeypatch):
    assert gc.get_freeze_count() == 0
    assert gc_policy.freeze_long_lived() is True
    assert gc.get_freeze_count() > 1000  # the modules, functions and classes of this process
    gc_policy.release()
    assert gc.get_freeze_count() == 0
    for off in ("0", "false", "Off", " no "):
        monkeypatch.setenv(gc_policy.ENV_VAR, off)
        assert gc_policy.freeze_long_lived() is False
        assert gc.get_freeze_count() == 0
    monkeypatch.setenv(gc_policy.ENV_VAR, "1")
    assert gc_policy.freeze_long_lived() is True


def test_young_cyclic_garbage_is_collected_before_the_freeze():
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    del cycle
    gc_policy.freeze_long_lived()
    gc_policy.release()
    gc.collect()  # nothing to find: freed before it could be frozen
    assert ref() is None


def test_a_frozen_cycle_given_up_later_is_collected_after_a_removal():
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    gc_policy.freeze_long_lived()
    del cycle
    gc.collect()
    assert ref() is not None  # frozen: a full collection skips it (why layer removals unfreeze)
    collected = gc_policy.collect_after_removal()
    assert ref() is None and collected >= 1
    assert gc.get_freeze_count() == 0  # frozen again only when a widget next starts work
