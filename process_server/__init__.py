"""The process server: receives batches from many agents, caches them durably, applies replicas."""
