"""probes: batched linear probes and streaming CKA on cached features."""
