"""Training: the loop and the parts of a step (optimizer step, tick statistics, preemption, EMAs, test hooks)."""
