"""Torch- and pandas-free foundations: errors, command-line helpers, atomic file IO, the config schema, label sets."""
