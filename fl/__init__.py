"""Federated simulation of Fed-PLoRA and its baselines: data, partitions, strategies, costs, runs.

Entry points: ``fed-plora run ...`` (see ``fl.cli``), ``fl.experiment.run_experiment(config)``,
and the strategies in ``fl.strategies`` for use in another harness.
"""
