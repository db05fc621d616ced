"""Entry points and distributed glue: train (DeepSpeed ZeRO-2), distributed (ranks, checkpoints), demo, learning_check, and the loader/training benchmarks."""
