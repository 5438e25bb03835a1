"""tidemark-bench: throughput, RPO and RTO measured against baselines in the same run."""
