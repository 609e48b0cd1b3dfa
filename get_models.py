"""Models, as the reference names them (``get_models.py``): the 1x1 temporal-conv projection
(``WXpB``, ``--pooling``), SeqNet's temporal convolution (``SeqNetConv``) and the model built
from the options (``get_model``), with the reference's state-dict keys.

The code is in ``seqmatchnet/models/sequence.py`` (the layers shared with the image models in
``seqmatchnet/models/layers.py``).
"""
from seqmatchnet.models.sequence import (  # noqa: F401
    METHODS,
    FrameModel,
    SeqMatchModel,
    SeqNetConv,
    WindowModel,
    WXpB,
    get_model,
    load_state,
)
