"""Sequence matching across speeds (``--velocities``): trajectories (``trajectories.py``), their
distances (``kernel.py``), the scoring rules across trajectories (``rules.py``), the streaming
top-k (``streaming.py``) and the training loss along trajectories (``loss.py``). The module
docstring of ``trajectories.py`` describes the method.
"""
