"""Tests of flows/_change.py that pin down behaviour mutation testing found unpinned."""
