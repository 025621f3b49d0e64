"""The whole system as processes on one machine: the launcher, `collafuse up` and `collafuse demo`."""
