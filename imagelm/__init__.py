"""imagelm: pretrain vision Transformers the way language models are pretrained, and measure
what the pretraining bought."""
__version__ = "0.1.0"
