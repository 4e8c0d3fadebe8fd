"""The evaluation tasks: the baselines and each family scored on the same split and selection."""
