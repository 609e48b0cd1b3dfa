"""Data: descriptor files (``.npy``, HDF5), MATLAB ``dbStruct`` files, the dataset table and
splits, sequence windows, positions CSVs, your own data and the embedded synthetic benchmark.
"""
