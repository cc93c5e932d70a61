"""Sinks: one module per sink family."""
