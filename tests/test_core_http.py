"""Tests of flows/_http.py that pin down behaviour mutation testing found unpinned."""
