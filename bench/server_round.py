"""One server round per method (aggregation plus the noise metrics) on random client factors: the server's
factor-based algorithms against the dense ones they replaced, time and peak memory.

    python -m bench.server_round            # every case below; JSON to bench/results/server_round-<device>.json
    python -m bench.server_round --quick    # MiniLM and 1024² layers only (seconds)

Cases: one layer of 384×384 (MiniLM), 1024×1024, 4096×4096 and 4096×11008, and a whole Llama-7B-sized layer set
(32 blocks × q, k, v, o of 4096×4096, gate and up of 11008×4096, down of 4096×11008); 10 clients with ranks
cycling over {2, 4, 8, 16} (global R = 16), and over {8, 16, 32, 64} (R = 64) for single layers. A round is
what the server does with the clients' updates: the method's ``aggregate`` (FlexLoRA's SVD, HetLoRA's norm
weights, ...), the initialisation noise of every client and the aggregation noise.

The dense path is the server as it was before (kept here only to be measured): FlexLoRA forms
``ΔW = Σ p_i B_i A_i`` and takes its full SVD, HetLoRA takes ``‖B_i A_i‖_F`` of dense products, and the noise
measures build every ``[N, K]`` update. It runs only where it fits the time (``DENSE_CASES``). Each measurement
runs in its own process (``torch`` on one thread), so that its peak resident memory above the inputs is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

from bench.common import format_table, write_result
from fed_plora.fl.measures.noise import initialisation_noise, round_aggregation_noise
from fed_plora.fl.strategies import STRATEGIES, ClientUpdate, Factors, build_strategy

LLAMA_7B_BLOCK = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
LAYER_SETS = {
    "minilm-384x384": [(384, 384)],
    "1024x1024": [(1024, 1024)],
    "4096x4096": [(4096, 4096)],
    "4096x11008": [(4096, 11008)],
    "llama7b-224-layers": LLAMA_7B_BLOCK * 32,
}
RANKS = {16: (2, 4, 8, 16), 64: (8, 16, 32, 64)}
CLIENTS = 10
#: (layer set, R) pairs where the dense path runs too (a 4096×11008 dense SVD takes minutes per layer here).
DENSE_CASES = {("minilm-384x384", 16), ("minilm-384x384", 64), ("1024x1024", 16), ("1024x1024", 64), ("4096x4096", 16)}
QUICK = ("minilm-384x384", "1024x1024")


def inputs(layers: list[tuple[int, int]], rank: int, seed: int = 0):
    """The global adapter (``a`` random, ``b`` random: a model some rounds in) and 10 clients' updates."""
    gen = torch.Generator().manual_seed(seed)
    start, updates = {}, []
    for i, (n, k) in enumerate(layers):
        start[f"l{i}"] = Factors(torch.randn(rank, k, generator=gen) / math.sqrt(k), torch.randn(n, rank, generator=gen) * 1e-2)
    for client in range(CLIENTS):
        r = RANKS[rank][client % 4]
        adapter, trained = {}, {}
        for name, (a, b) in start.items():
            new_a, new_b = torch.zeros_like(a), torch.zeros_like(b)
            new_a[:r] = a[:r] + torch.randn(r, a.shape[1], generator=gen) * 1e-3
            new_b[:, :r] = b[:, :r] + torch.randn(b.shape[0], r, generator=gen) * 1e-3
            adapter[name], trained[name] = Factors(new_a, new_b), torch.arange(r)
        updates.append(ClientUpdate(client, 100 + 10 * client, adapter, trained, {}))
    return start, updates


def strategy_for(method: str, start):
    """The method over ``start``; FedIT at the smallest client rank, as a run config sets it."""
    rank = next(iter(start.values())).a.shape[0]
    options = {"client_rank": RANKS[rank][0]} if method == "fedit" else {}
    return build_strategy(method, start, {}, **options)


def factor_round(method: str, start, updates) -> None:
    """The server's round as it is (``fl.rounds.run_server``): ``aggregate`` and both noise measures from factors."""
    strategy = strategy_for(method, start)
    before = {n: strategy.global_factors(n) for n in start}
    for update in updates:
        initialisation_noise((update.adapter[n], before[n]) for n in start)
    weights = strategy.client_weights(updates).tolist()
    result = strategy.aggregate(0, updates)
    round_aggregation_noise(strategy, result.base_update, updates, weights)


def dense_round(method: str, start, updates) -> None:
    """The server's round as it was: FlexLoRA and HetLoRA on dense products, noise on dense ``[N, K]`` updates."""
    strategy = strategy_for(method, start)
    weights = strategy.client_weights(updates)
    before = {n: f.delta() for n, f in start.items()}
    for update in updates:
        _dense_relative_error({n: f.delta() for n, f in update.adapter.items()}, before)
    if method == "flexlora":
        after = {}
        for name, (a, _) in start.items():
            delta = sum(w * u.adapter[name].delta() for w, u in zip(weights.tolist(), updates))
            u_mat, s_vec, vh = torch.linalg.svd(delta, full_matrices=False)
            after[name] = (u_mat[:, : a.shape[0]] * s_vec[: a.shape[0]]) @ vh[: a.shape[0]]  # the global model's ΔW
    elif method == "hetlora":
        after = {}
        for name in start:
            norms = torch.tensor([float(torch.linalg.matrix_norm(u.adapter[name].delta())) for u in updates])
            p = norms / norms.sum()
            a = sum(w * u.adapter[name].a for w, u in zip(p.tolist(), updates))
            b = sum(w * u.adapter[name].b for w, u in zip(p.tolist(), updates))
            after[name] = b @ a
    else:
        result = strategy.aggregate(0, updates)
        after = {n: strategy.global_factors(n).delta() for n in start}
        if result.base_update is not None:
            after = {n: after[n] + result.base_update[n].delta() for n in start}
    ideal = {n: sum(w * u.adapter[n].delta() for w, u in zip(weights.tolist(), updates)) for n in start}
    _dense_relative_error(after, ideal)


def _dense_relative_error(estimate: dict, target: dict) -> float:
    num = sum(float(torch.linalg.matrix_norm(estimate[n] - target[n])) ** 2 for n in target)
    den = sum(float(torch.linalg.matrix_norm(target[n])) ** 2 for n in target)
    return math.sqrt(num / den) if den else 0.0


def measure(layer_set: str, rank: int, method: str, path: str, repeat: int) -> dict:
    """One case in this process: median seconds over ``repeat`` rounds and the peak RSS growth above the inputs."""
    torch.set_num_threads(1)
    start, updates = inputs(LAYER_SETS[layer_set], rank)
    round_fn = factor_round if path == "factors" else dense_round
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        round_fn(method, start, updates)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_rss_growth_mib": peak / 2**20}


def run_case(layer_set: str, rank: int, method: str, path: str) -> dict:
    repeat = 3 if path == "factors" else 1
    call = f"measure({layer_set!r}, {rank}, {method!r}, {path!r}, {repeat})"
    code = f"import json; from bench.server_round import measure; print(json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM and 1024² layers only")
    args = parser.parse_args(argv)
    rows = []
    for layer_set, layers in LAYER_SETS.items():
        if args.quick and layer_set not in QUICK:
            continue
        for rank in (16, 64):
            if rank == 64 and len(layers) > 1:
                continue  # the 7B set at R = 64: 6.4 GB of client factors alone
            for method in STRATEGIES:
                row = {"layers": layer_set, "count": len(layers), "R": rank, "method": method}
                ours = run_case(layer_set, rank, method, "factors")
                row.update(seconds=ours["seconds"], peak_mib=ours["peak_rss_growth_mib"])
                if (layer_set, rank) in DENSE_CASES:
                    dense = run_case(layer_set, rank, method, "dense")
                    row.update(dense_seconds=dense["seconds"], dense_peak_mib=dense["peak_rss_growth_mib"])
                    row["dense_over_ours"] = dense["seconds"] / ours["seconds"]
                rows.append(row)
                print(format_table([row], list(row)), flush=True)
    columns = ["layers", "R", "method", "seconds", "peak_mib", "dense_seconds", "dense_peak_mib", "dense_over_ours"]
    print(format_table(rows, columns))
    payload = {
        "command": "python -m bench.server_round" + (" --quick" if args.quick else ""),
        "clients": CLIENTS,
        "client_ranks": {str(r): list(v) for r, v in RANKS.items()},
        "threads": 1,
        "dtype": "float32 factors (norms and SVD in float64)",
        "rows": rows,
    }
    print(f"\nwritten: {write_result('server_round' + ('_quick' if args.quick else ''), payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
