"""Helpers, as the reference names them (``utils.py``): errors, devices, seeding, atomic file
writes and logging.

The code is in ``seqmatchnet/common/`` (``errors.py``, ``runtime.py``, ``files.py``,
``logs.py``) and ``seqmatchnet/runs/tracking.py`` (TensorBoard and wandb).
"""
from seqmatchnet.common.errors import UserError  # noqa: F401
from seqmatchnet.common.files import atomic_write, write_json_atomic  # noqa: F401
from seqmatchnet.common.logs import setup_logging  # noqa: F401
from seqmatchnet.common.runtime import get_device, make_deterministic  # noqa: F401
from seqmatchnet.runs.tracking import MetricsWriter  # noqa: F401
