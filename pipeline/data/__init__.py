"""Data for local runs: the synthetic bin-photo generator and the mirror of real ABID."""
