"""Inputs: where arrays come from (path, FILE.npz:KEY, stdin, a typed number) and how they load."""
