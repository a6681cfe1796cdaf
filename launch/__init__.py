"""Entry points: the training command (train.py, run by accelerate launch) and the demo."""
