"""``--mode localize``: online relocalisation, one query frame at a time, from a replayed split or
a stream of descriptors; run as ``python main.py --mode localize ...``.

The mode's entry is ``seqmatchnet/cli/localize.py``; the reusable matcher is
``seqmatchnet.online.Localizer`` (``from seqmatchnet import Localizer`` in your own code, e.g. a
robot's node), the stream format ``seqmatchnet/online/streams.py``.
"""
from seqmatchnet.cli.localize import main, run_localize  # noqa: F401
from seqmatchnet.online.localizer import Localizer, Match  # noqa: F401
