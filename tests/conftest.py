"""Shared fixtures: arrays on real member files in a temporary directory."""

from __future__ import annotations

import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

logging.basicConfig(level=logging.WARNING)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture
def raw_mount(tmp_path):
    """A factory of raw mounts that are always unmounted at teardown."""
    from mountutil import RawMount

    made: list[RawMount] = []

    def make(warehouse, name="mnt"):
        m = RawMount(warehouse, tmp_path / name)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()
