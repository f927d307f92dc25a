"""``fedmr study``: a grid of experiments declared in one file, run resumably (here, N at once, or on
Ray), equal finished runs reused, and a results page built from the run folders alone.

spec.py (the study file -> cells), index.py (which folder holds each cell), execute.py (running
cells), report.py (the results page; its parts beside it: cells, sheet, contrasts, sections, clients,
flatness, precision, plots, text), cli.py (the two commands)."""
