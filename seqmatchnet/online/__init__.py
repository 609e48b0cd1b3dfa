"""Online relocalisation: the causal matcher ``Localizer`` (one query frame at a time, or one step
per ``spacing`` metres of odometry), the binary stream format of live descriptors, and the MCAP bag
of matches (``bag_output.py``).
"""
