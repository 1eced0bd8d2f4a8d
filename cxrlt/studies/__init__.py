"""Studies: a spec expanded into variants, and their report."""
