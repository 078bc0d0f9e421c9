"""Calibration of the similarity → K table on a checkpoint's own generations (``nirvana calibrate --workload``).

``bounds``: one-sided 95% upper bounds (Wilson for leak rates, bootstrap for mean losses) and the pairs a band still
needs; ``generate``: pairs generated with the engine's denoise code; ``pairs``: the pairs a workload makes;
``fidelity``: scorers by name; ``fit``: the per-band, per-K fit that holds a budget at the upper bound.
"""
