"""One run directory: every method of a config and its reference rows, written and resumable.

- ``experiment``: ``run_experiment`` / ``resume_experiment``;
- ``rundir``: the directory's manifest, the checks before anything is written, ``--overwrite`` and resume;
- ``references``: the reference rows (untrained, majority, centralised, local);
- ``report``: ``metrics.jsonl``, the summary table and the curves.
"""
