"""Text tokenizer: byte-level BPE (GPT-2/CLIP style) trained with HuggingFace `tokenizers`.

Byte-level means every string round-trips exactly (no unknown token, no normalisation), and a
vocabulary trained on the small caption corpus still encodes any text. Sequences end with
<|endoftext|> as in CLIP, whose text tower pools at that token; pads come after it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

EOT, PAD, MASK, BOI, EOI = "<|endoftext|>", "<pad>", "<mask>", "<boi>", "<eoi>"
SPECIAL_TOKENS = [EOT, PAD, MASK, BOI, EOI]      # ids 0..4, in this order


class TextTokenizer:
    """A trained `tokenizers.Tokenizer` with fixed-length batch encoding for the models."""

    def __init__(self, tok):
        self.tok = tok
        ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.eot_id, self.pad_id, self.mask_id, self.boi_id, self.eoi_id = ids
        if hasattr(tok, "encode_special_tokens"):     # tokenizers>=0.15.1
            tok.encode_special_tokens = True          # "<pad>" typed in a caption is text, not the pad id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of the text alone (no <|endoftext|>); special-token strings in it are split
        like any text, so a caption cannot inject control tokens."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, texts: str | Sequence[str], context_length: int) -> torch.Tensor:
        """(B, L) int64: tokens, then <|endoftext|>, then <pad>. A text too long is cut to L - 1
        tokens and still ends with <|endoftext|>, so the end-of-text position always exists."""
        if context_length < 1:
            raise ValueError("context_length must be at least 1 (room for <|endoftext|>)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.int64)
        batch = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)   # _fast: no offsets (>=0.20)
        for i, enc in enumerate(batch(texts, add_special_tokens=False)):
            ids = enc.ids[:context_length - 1] + [self.eot_id]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def encode_one(self, text: str, context_length: int) -> torch.Tensor:
        """(L,) int64: one row of encode(), for a loader's per-sample work."""
        ids = self.encode_ids(text)[:context_length - 1] + [self.eot_id]
        out = torch.full((context_length,), self.pad_id, dtype=torch.int64)
        out[:len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one sequence (1-D) or of each row (2-D); special tokens and padding dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return self.tok.decode_batch([list(r) for r in ids], skip_special_tokens=True)
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B,) index of each row's first <|endoftext|> (where CLIP pools)."""
        return (ids == self.eot_id).int().argmax(-1)

    def save(self, path: str | Path) -> Path:
        """tokenizer.json (HuggingFace format), written atomically; a directory gets
        DIR/tokenizer.json."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        self.tok.save(str(tmp))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no text tokenizer at {path}")
        return cls(Tokenizer.from_file(str(path)))


class CaptionTokens:
    """A loader's per-sample text transform: a caption -> {"text": (L,) tokens}."""

    def __init__(self, tokenizer: TextTokenizer, context_length: int):
        self.tok, self.L = tokenizer, context_length

    def __call__(self, text: str, u) -> dict[str, torch.Tensor]:
        if not isinstance(text, str):
            raise TypeError(f"expected a caption, got a {type(text).__name__}")
        return {"text": self.tok.encode_one(text, self.L)}


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> TextTokenizer:
    """Byte-level BPE on `texts`. The vocabulary holds the 256 byte symbols, the special tokens
    and at most vocab_size - 261 merges (fewer when the corpus runs out of pairs seen
    min_frequency times: a small caption corpus gives a small vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)


def load_or_train(path: str, vocab: int, texts: list[str] | None, run_dir: str | Path, log=print) -> TextTokenizer:
    """The saved tokenizer at `path`, or RUN/text_tokenizer when path is ""; trained on `texts`
    and saved there when there is none (rank 0 writes it)."""
    from imagelm import dist

    where = Path(path) if path else Path(run_dir) / "text_tokenizer"
    if (where / "tokenizer.json").exists():
        tok = TextTokenizer.load(where)
        log(f"text tokenizer: loaded {where} ({tok.vocab_size} tokens)")
    else:
        if not texts:
            raise ValueError(f"no text tokenizer at {where} and no text to train one on")
        tok = train_text_tokenizer(texts, vocab)
        if not dist.world_size() > 1 or torch.distributed.get_rank() == 0:
            tok.save(where)
        log(f"text tokenizer: trained byte-level BPE on {len(texts)} texts ({tok.vocab_size} tokens), saved to {where}")
    if tok.vocab_size > vocab:
        raise ValueError(f"text tokenizer {where} has {tok.vocab_size} tokens; the model embeds {vocab}")
    return tok
