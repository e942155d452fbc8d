"""Cluster membership and quorum: who is alive, and may this host act on a peer's failure."""
