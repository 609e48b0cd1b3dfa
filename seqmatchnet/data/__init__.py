"""Data: descriptor files (``.npy``, HDF5), MATLAB ``dbStruct`` files, the dataset table and
splits, sequence windows, positions CSVs, frames kept by distance travelled (``spacing.py``), your
own data (``own*.py``), ROS 1 / ROS 2 / MCAP bags (``bags.py``, ``bag_frames.py``) and the
embedded synthetic benchmark.
"""
