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
