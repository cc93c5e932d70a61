"""Tests of flows/_runtime.py that pin down behaviour mutation testing found unpinned."""
