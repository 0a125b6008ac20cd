"""Fed-PLoRA in a Flower ServerApp of your own.

``FlowerStrategy`` runs any fed-plora strategy (``FedPLoRA``, ``FedIT``, ``FLoRA``, ``HetLoRA``,
``FlexLoRA``) on Flower. It takes the strategy and the run's ``Config``: the config says which clients
there are (``[federation]``: count, fraction per round, rank budgets) and travels with every train
message to fed-plora's ClientApp, which builds each client's model, data shard and training from it.
This ServerApp trains ``FedPLoRA`` for the config's rounds, prints each round's record and saves the
final global adapter and head (safetensors, keys ``adapter.<layer>.a|b`` and ``extra.<name>``).

Run it on Flower's simulation engine (``pip install -e ".[flower]"``), one SuperNode per client:

    python docs/examples/flower_server_app.py --config configs/cola_minilm.toml --data-dir /path/to/data \\
        --set federation.rounds=3 --out adapter.safetensors
"""

from __future__ import annotations

import argparse

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from fed_plora.fl import Config, load_config
from fed_plora.fl.flower import FlowerStrategy
from fed_plora.fl.model import initial_adapter
from fed_plora.fl.strategies import FedPLoRA


def server_app(config: Config, out: str) -> ServerApp:
    """A ServerApp that trains ``FedPLoRA`` under ``config`` and saves the global adapter to ``out``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        adapter, extra = initial_adapter(config)  # the global model's starting point
        strategy = FedPLoRA(adapter, extra, seed=config.run.seed)
        flower = FlowerStrategy(strategy, config, on_round=print)
        result = flower.start(grid, flower.global_arrays(), num_rounds=config.federation.rounds)
        save_file(result.arrays.to_torch_state_dict(), out)

    return app


if __name__ == "__main__":
    from flwr.simulation import run_simulation

    from fed_plora.fl.flower.client_app import app as client_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML run config (default: the built-in defaults)")
    parser.add_argument("--data-dir", help="local task data (else $FED_PLORA_DATA, else the Hugging Face Hub)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config field")
    parser.add_argument("--out", default="fedplora_adapter.safetensors")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    if args.data_dir:
        config.task.data_dir = args.data_dir
    backend = {"client_resources": {"num_cpus": 1}, "init_args": {"include_dashboard": False}}
    run_simulation(server_app(config, args.out), client_app, num_supernodes=config.federation.clients, backend_config=backend)
