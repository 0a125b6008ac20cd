"""Client-level differential privacy: the mechanism of a private round (``mechanism``: clip, sum, noise, in
the sum form a secure-aggregation protocol could compute) and the privacy a run spends (``accounting``)."""
