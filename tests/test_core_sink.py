"""Tests of flows/_sink.py that pin down behaviour mutation testing found unpinned."""
