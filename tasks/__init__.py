"""Tasks: the models and training scripts of the paper's experiments."""
