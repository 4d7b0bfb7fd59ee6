"""Progress bars: every long loop of the library shows one, made here, so that a caller turns them all
off at once with :func:`set_enabled` (the study does, for the steps it runs: its own bar is the one
bar). ``TQDM_DISABLE=1`` in the environment turns them off too, as for any tqdm bar; a bar that is off
for another reason (a process that is not the main one) stays off either way.
"""

from __future__ import annotations

from contextlib import contextmanager

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


@contextmanager
def disabled():
    """No library bar inside the block."""
    previous = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def progress(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar, off where the caller or the library's switch says so. ``disable=None`` (tqdm's "off when
    not a terminal") is kept as it is."""
    return tqdm(iterable, disable=True if not _enabled else disable, **kwargs)
