"""The local stack: an embedded Valkey, local worker processes, and `embedq up` (Valkey, workers, Flower and
the gateway on one machine)."""
