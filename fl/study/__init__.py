"""``fed-plora study``: a grid of settings × seeds, one run directory per cell, and its report.

- ``config``: the study file (``load_study``) and each cell's run config;
- ``cells``: a cell's state on disk and the check that its run is the one the study gives it;
- ``runner``: ``run_study``, the cells in order or in worker processes, resumable;
- ``report``: ``write_report``, per setting the mean ± std of every method and the paired verdicts;
- ``stats``: mean, standard deviation and the paired t interval; ``plots``: the report's figures.
"""
