"""Fed-PLoRA on Flower (``pip install fed-plora[flower]``): the same rounds, strategies and per-round
report as the in-process simulator, with clients on Flower SuperNodes.

- ``FlowerStrategy`` (``strategy``): a Flower strategy that runs any of ours, for a ServerApp of one's own;
- ``run_on_flower`` (``server_app``): a whole ``fed-plora`` run over a Flower Grid; ``server_app.app`` and
  ``client_app.app`` are the ``ServerApp`` and ``ClientApp`` (``flower_app/`` declares them for ``flwr run``);
- ``secure``: a private run's rounds under Flower's SecAgg+ (``SecAggSettings``; the server sees only sums);
- ``wire``: plans and updates as Flower messages, and their size as Flower serialises them.

Nothing else in the package imports this one, so that Flower stays optional.
"""

from .server_app import config_from_run_config, run_on_flower
from .strategy import FlowerStrategy

__all__ = ["FlowerStrategy", "config_from_run_config", "run_on_flower"]
