"""`ce-check explain`: the derivation of dC/dz = a - y checked step by step on one sample."""
