"""Fed-PLoRA on Flower (``pip install fed-plora[flower]``): the same rounds, strategies and per-round
report as the in-process simulator, with clients on Flower SuperNodes.

- ``wire``: plans and updates as Flower messages, and their size as Flower serialises them;
- ``strategy``: ``FlowerStrategy``, a Flower strategy that drives a ``fl.server.FederatedServer``;
- ``server_app`` / ``client_app``: the ``ServerApp`` and ``ClientApp`` (``flower_app/`` declares them
  for ``flwr run``).

Nothing here is imported by the rest of the package, so that Flower stays optional.
"""
