"""Entry points and distributed glue: train (DeepSpeed ZeRO-2), distributed (ranks, checkpoints), feature extraction,
the ablation study, evaluation and prediction, the demo, the GPU check, and the benchmarks."""
