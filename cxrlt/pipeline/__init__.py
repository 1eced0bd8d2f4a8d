"""What Make runs: the plan (stamps and generated rules), stage inputs and fingerprints. Torch- and pandas-free."""
