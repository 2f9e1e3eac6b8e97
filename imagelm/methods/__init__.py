"""Methods: (tokens) + (the shared backbone with an attention pattern) + (an objective).

The contract every method keeps (checked over every registered method by tests/test_contract.py):

- it is a `Method`: an nn.Module registered under a name, built from (ModelConfig, its own
  `Config` dataclass, the paper's defaults), with `encoder` (the ViT kept downstream:
  `encoder.features(images, layers)`), `noise_dim` (the uniform numbers per sample it draws: the
  data pipeline draws them for the global batch, so any number of ranks sees the same random
  choices) and `forward(batch) -> Output(loss, metrics)`;
- its loss is a mean over samples of per-sample terms, or couples the samples of a batch
  (`couples_samples`, e.g. InfoNCE over every pair): then any split of the batch over ranks gives
  one process's loss and gradients, and only coupled losses refuse gradient accumulation;
- what some methods offer beyond that is a capability below: callers ask `isinstance(m, Cap)`
  and `require(m, Cap, what)` refuses with the methods that have it, never a method's name.
"""
from imagelm.methods.base import (METHODS, Completes, EmbedsImageText, ExportsText, ExposesLatent,  # noqa: F401
                                  FusesImageText, HasBenchmarks, HasTimmPeer, Method, Output, PreparesData,
                                  ReadsText, Reconstructs, SeparateImageTextPaths, TransformsText, build_method,
                                  methods_with, register, require)
from imagelm.methods import aim, beit, beit3, clip, igpt, lcl, mae  # noqa: E402,F401  (registers)
