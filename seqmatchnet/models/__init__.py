"""The window models: the frame model with the 1x1 temporal-conv projection and SeqNet's window
model behind one interface (``sequence.py``), and the layers shared with the image models.
"""
