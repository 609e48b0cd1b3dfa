"""Datasets, as the reference names them (``get_datasets.py``): the table of datasets
(Nordland, Oxford RobotCar, MSLS, the synthetic benchmark, your own ``custom:NAME``) and the
loading of one split from the options.

The code is in ``seqmatchnet/data/``: ``specs.py`` (the table, ``get_split``), ``descriptors.py``
(``.npy`` and HDF5 descriptor files), ``structs.py`` (MATLAB ``dbStruct`` files),
``windows.py`` (``Split`` and the sequence windows).
"""
from seqmatchnet.data.specs import DATASETS, get_spec, get_split, load_split  # noqa: F401
from seqmatchnet.data.structs import DbStruct, load_struct  # noqa: F401
from seqmatchnet.data.windows import Split, sequence_windows  # noqa: F401
