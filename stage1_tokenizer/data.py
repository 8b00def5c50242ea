"""Image data for the tokenizer: folders of images, the official crops, and a resumable sampler.

Layouts accepted (``find_images``):
    root/<class>/<image>   ImageNet style (label = index of the class folder in sorted order)
    root/<image>           a plain folder (label 0)
Images in nested sub-folders of a class folder belong to that class.

Transforms follow the official pipeline (reference §6): resize the shorter side to R (torchvision's
default: bilinear, antialiased on PIL images), then a random R x R crop for training or the centre crop for
evaluation; pixels x/127.5 - 1 in [-1, 1]. No flips, no other augmentation.

Resume exactness: the sampler yields keys ``(epoch, index)`` instead of bare indices, and the random crop
of a sample is a pure function of (seed, epoch, index). Which worker decodes a sample, or whether the run
was restarted, therefore never changes the pixels a step sees. The sampler's iterator is Stateful, so
``torchdata``'s StatefulDataLoader stores the data position in a few integers.

Unreadable files never stop an epoch: the failure is logged with its reason and the next readable file
(in index order) stands in, so batch sizes and the step count stay fixed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset, Sampler

from shared.image_files import IMAGE_EXTENSIONS, is_image_file
from shared.runlog import get_logger

log = get_logger(__name__)

# Truncated JPEGs must fail loudly (and be skipped), not decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _is_image(p: Path) -> bool:
    return is_image_file(p.name) and p.is_file()


def find_images(root: Path) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """(path, label) pairs sorted by path, and the class names; see the module doc for layouts."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: List[Tuple[Path, int]] = []
    for label, name in enumerate(classes):
        items += [(p, label) for p in sorted((root / name).rglob("*")) if _is_image(p)]
    loose = sorted(p for p in root.iterdir() if _is_image(p))
    if loose and classes and items:
        raise ValueError(f"{root} mixes class folders and loose images; use one layout")
    if not items:
        classes = [] if not loose else [root.name]
        items = [(p, 0) for p in loose]
    if not items:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return items, classes


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    # torchvision's Resize(int) on a PIL image: long side int(size * long / short), bilinear (antialiased)
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img.resize((nw, nh), Image.BILINEAR)


def crop_box(w: int, h: int, size: int, rng: Optional[np.random.Generator]) -> Tuple[int, int, int, int]:
    """Top-left random crop when ``rng`` is given, else the centre crop (torchvision's rounding)."""
    if rng is None:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return left, top, left + size, top + size


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (x / 127.5 - 1, as the official loader)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


class ImageFolderDataset(Dataset):
    """Decoded, cropped images in [-1, 1] with their labels.

    ``train=True`` takes random crops; a key ``(epoch, index)`` picks the crop deterministically. A bare
    integer index (evaluation, simple use) means epoch 0.
    """

    def __init__(self, root: Path, resolution: int, train: bool = True, seed: int = 0, max_retries: int = 50):
        self.root = Path(root)
        self.items, self.classes = find_images(self.root)
        self.resolution = int(resolution)
        self.train = train
        self.seed = int(seed)
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, epoch: int = 0) -> torch.Tensor:
        path = self.items[index][0]
        with Image.open(path) as img:
            img.load()
            img = resize_shorter(img.convert("RGB"), self.resolution)
        rng = np.random.default_rng((self.seed, epoch, index)) if self.train else None
        return to_tensor(img.crop(crop_box(*img.size, self.resolution, rng)))

    def __getitem__(self, key) -> Dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for attempt in range(self.max_retries):
            i = (index + attempt) % len(self.items)
            try:
                image = self.load(i, epoch)
                return {"image": image, "label": torch.tensor(self.items[i][1]), "index": torch.tensor(i)}
            except Exception as e:  # any decoder error: log, stand in the next file, keep the epoch going
                log.warning("skipping unreadable image %s: %s: %s", self.items[i][0], type(e).__name__, e)
        raise RuntimeError(f"{self.max_retries} consecutive unreadable images from index {index} in {self.root}")


class EpochSampler(Sampler):
    """Endless ``(epoch, index)`` keys: a fresh permutation per epoch (seed + epoch), sharded by rank.

    Every rank gets ``len(dataset) // world_size`` keys per epoch (the tail is dropped, as
    DistributedSampler(drop_last=True)), so all ranks take the same number of steps.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if n < world_size:
            raise ValueError(f"{n} images cannot be shared by {world_size} ranks")
        self.n, self.seed, self.shuffle = n, int(seed), shuffle
        self.rank, self.world_size = rank, world_size
        self.per_rank = n // world_size

    def keys(self, epoch: int) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        return perm[self.rank: self.per_rank * self.world_size: self.world_size]

    def __iter__(self) -> "_EpochSamplerIter":
        return _EpochSamplerIter(self)

    def __len__(self) -> int:  # one epoch; the iterator itself never ends
        return self.per_rank


class _EpochSamplerIter(Iterator):
    def __init__(self, sampler: EpochSampler):
        self.s = sampler
        self.epoch, self.pos = 0, 0
        self._keys = sampler.keys(0)

    def __next__(self):
        if self.pos == len(self._keys):
            self.epoch, self.pos = self.epoch + 1, 0
            self._keys = self.s.keys(self.epoch)
        key = (self.epoch, self._keys[self.pos])
        self.pos += 1
        return key

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._keys = self.s.keys(self.epoch)


def collate(batch: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def make_train_loader(dataset: ImageFolderDataset, batch_size: int, num_workers: int, seed: int,
                      rank: int = 0, world_size: int = 1, pin_memory: bool = False):
    """A StatefulDataLoader over endless epochs; its state_dict() is the exact data position."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from shared.preemption import worker_ignores_signals

    sampler = EpochSampler(len(dataset), seed=seed, shuffle=True, rank=rank, world_size=world_size)
    return StatefulDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        drop_last=True, pin_memory=pin_memory, persistent_workers=False,
        multiprocessing_context="fork" if num_workers > 0 else None,
        worker_init_fn=worker_ignores_signals,  # preemption signals are the trainer's to handle
    )


def make_eval_loader(dataset: ImageFolderDataset, batch_size: int, num_workers: int = 0,
                     rank: int = 0, world_size: int = 1, limit: Optional[int] = None):
    """Centre crops in file order; ``limit`` keeps the first N images. No sample is dropped or repeated."""
    from torch.utils.data import DataLoader, Subset

    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = list(range(rank, n, world_size))
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate, drop_last=False)


__all__ = ["find_images", "ImageFolderDataset", "EpochSampler", "make_train_loader", "make_eval_loader", "collate"]
