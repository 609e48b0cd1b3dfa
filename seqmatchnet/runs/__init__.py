"""Run folders: their layout and ``flags.json`` (``folders.py``), checkpoints, loading a run for
testing or resuming, and TensorBoard / wandb logging (``tracking.py``).
"""
