"""What a round costs and how far its updates are from the ideal ones.

- ``costs``: traffic from the tensors actually sent, training and folding FLOPs, per-round means;
- ``noise``: initialisation and aggregation noise, from factors;
- ``evaluation``: the global model's metrics on the evaluation split;
- ``memory``: a round's peak memory.
"""
