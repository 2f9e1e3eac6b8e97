"""imagelm: pretrain vision Transformers the way language models are pretrained, and measure
what the pretraining bought."""
__version__ = "0.1.0"


def load(path):
    """A run directory or an exported folder -> its encoder with its preprocessing (see imagelm.api)."""
    from imagelm.api import load as _load

    return _load(path)
