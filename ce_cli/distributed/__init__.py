"""Running checks on a cluster (optional: `pip install 'ce-check[dask]'`). Nothing here is
imported unless a command asks for a cluster."""
