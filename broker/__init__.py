"""The broker: routes jobs from many nodes to a pool of workers. Needs no torch and no GPU."""
