"""`scripts/bench`: JackPay's throughput and latency, side by side with the limits of the
same machine measured in the same run (echo over the same frames, three-hop echo, fsync)."""
