"""`nirvana calibrate`: ``command`` (the typer command and its two sources), ``workload`` (``--workload``: a
checkpoint's own generations) and ``report`` (report.json, summary.md and the per-band grids)."""
