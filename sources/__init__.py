"""Sources: one module per source family."""
