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


def _mounts(cls, tmp_path):
    """A factory of mounts of class `cls` and its teardown, which unmounts every one."""
    made = []

    def make(warehouse, name="mnt"):
        m = cls(warehouse, tmp_path / name)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()


@pytest.fixture
def raw_mount(tmp_path):
    """A factory of raw mounts that are always unmounted at teardown."""
    from mountutil import RawMount

    yield from _mounts(RawMount, tmp_path)


@pytest.fixture
def fs_mount(tmp_path):
    """A factory of filesystem mounts that are always unmounted at teardown."""
    from mountutil import FsMount

    yield from _mounts(FsMount, tmp_path)


@pytest.fixture
def mounted_fs(tmp_path, fs_mount):
    """A fresh raidz2 warehouse of five 64 MiB members, mounted; yields the FsMount."""
    from mountutil import make_warehouse

    m = fs_mount(make_warehouse(tmp_path / "wh"))
    m.mount()
    yield m
