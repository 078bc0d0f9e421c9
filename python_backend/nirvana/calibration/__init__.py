"""Calibration of the similarity → K table (``nirvana calibrate``), all of it: ``table`` fits it from judged
records, checks it on held-out pairs and writes it as server config; the rest calibrates on a checkpoint's own
generations (``--workload``).

``bounds``: one-sided 95% upper bounds (Wilson for leak rates, bootstrap for mean losses) and the pairs a band still
needs; ``generate``: pairs generated with the engine's denoise code; ``pairs``: the pairs a workload makes;
``fidelity``: scorers by name; ``fit``: the per-band, per-K fit that holds a budget at the upper bound.
"""
