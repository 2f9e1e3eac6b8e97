"""An image folder (ImageNet layout: ROOT/CLASS/IMAGE) read from disk as it trains: listing only,
no decoding up front. The file list is held as one numpy bytes array and one int32 label array,
so memory is a few dozen bytes per image, and forked DataLoader workers share it without the
copy-on-write growth Python lists of str cause (every refcount touch copies a page)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from imagelm.data.images import eval_view, train_view

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
REPLACE_TRIES = 16      # a corrupt file is replaced by the next readable one of the list


class FolderSet:
    """root/CLASS/*.{jpg,png,...}. `classes`: the train split's class list (a test split takes it,
    so its labels index the same classes; images of a class train lacks are left out and counted)."""
    workers = -1              # decoding processes for eval passes and samples (data.workers)
    eval_skipped = 0
    skipped = 0               # unreadable files found before training (none: found as it trains)
    images_per_sample, text, labelled, corpus = 1, False, True, None

    def __init__(self, root: str | Path, channels: int, size: int, classes: list[str] | None = None,
                 strict: bool = False, say=print):
        from imagelm.data.sources import DatasetMissing

        self.root, self.channels, self.size, self.strict = Path(root), channels, size, strict
        if not self.root.is_dir():
            raise DatasetMissing(f"image folder {self.root} does not exist")
        present = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not present and classes is None:
            raise DatasetMissing(f"{self.root} has no class subfolders (expected ROOT/CLASS/IMAGE)")
        self.classes = list(classes) if classes is not None else present
        index = {c: i for i, c in enumerate(self.classes)}
        names, labels, self.not_regular, unknown = [], [], 0, {}
        for c in present:
            files = []
            for e in os.scandir(self.root / c):     # d_type from readdir: no stat per file
                name = e.name
                if name[name.rfind("."):].lower() not in IMAGE_SUFFIXES:
                    continue
                if not e.is_file():         # a FIFO, socket or device named like an image: never opened
                    self.not_regular += 1
                    continue
                files.append(name.encode("utf-8", "surrogateescape"))      # = os.fsencode
            if c not in index:
                unknown[c] = len(files)
                continue
            files.sort()
            names += files
            labels += [index[c]] * len(files)
        if self.not_regular:
            say(f"warning: {self.not_regular} entries under {self.root} named like images are not regular files "
                f"(FIFOs, sockets, ...): left out")
        if sum(unknown.values()):
            say(f"warning: {sum(unknown.values())} images under {self.root} are in classes the train split lacks "
                f"({', '.join(sorted(unknown))}): left out")
        if not names:
            raise DatasetMissing(f"no images under {self.root} (expected ROOT/CLASS/*.jpg|png|...)")
        self.names = np.array(names, dtype=np.bytes_)                 # (N,) fixed-width bytes
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))
        self.mean: list[float] = []
        self.std: list[float] = []

    def __len__(self) -> int:
        return len(self.names)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.classes[int(self.labels[i])], os.fsdecode(self.names[i]))

    def describe(self, i: int) -> str:
        return self.path(i)

    # --- per-sample work, in DataLoader workers -------------------------------------------------
    def train_sample(self, i: int, u: np.ndarray, cfg) -> tuple[torch.Tensor, int, int, str]:
        """(image, label, skipped, error) for sample i: a corrupt file is replaced by the next
        readable one (skipped=1) or, under strict, reported (error names the file)."""
        for k in range(REPLACE_TRIES):
            j = (i + k) % len(self)
            try:
                x = train_view(self.path(j), self.channels, self.size, u, cfg.crop_scale, cfg.crop_ratio, cfg.flip,
                               cfg.color_jitter)
                return x, int(self.labels[j]), int(k > 0), ""
            except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt file
                if self.strict:
                    return torch.zeros(0), -1, 1, f"cannot decode {self.path(j)}: {e}"
                if k == 0:
                    log.warning("skipping unreadable image %s: %s", self.path(j), e)
        return torch.zeros(0), -1, 1, f"{REPLACE_TRIES} unreadable images in a row from {self.path(i)}"

    def eval_sample(self, i: int) -> tuple[torch.Tensor | None, str]:
        try:
            return eval_view(self.path(i), self.channels, self.size), ""
        except Exception as e:  # noqa: BLE001
            return None, f"cannot decode {self.path(i)}: {e}"
