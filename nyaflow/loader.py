"""The training data: bucketed shards -> deterministic, rank-sharded, bucket-homogeneous batches.

Order: for epoch e, every bucket's samples are permuted with the generator seeded by (seed, e) and cut
into micro batches; while the number of batches is not a multiple of the world size, the largest batch is
split in two, so that every rank takes the same number of steps and no sample is dropped or repeated
(a few batches at the end of a bucket are then smaller than train.micro_batch; only when every batch holds
a single sample and their number is not a multiple of the world size are the last `number % world_size`
left out of that epoch, a different few each epoch). The batches of all buckets
are permuted together and micro batch j goes to global rank j % world_size. Every sample is visited exactly
once per epoch, for any world size and any number of loader workers (workers only prefetch the batches of
this fixed list, in order). The position in the data is a function of the micro-step count alone: a run
resumed at micro-step k sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nyaflow.shards import TarIndex


class TrainingSet(torch.utils.data.Dataset):
    """All samples listed in a data manifest (training shards, or cached-latent shards: nyaflow.latents).

    Item: {pixels [3, h, w] in [-1, 1] | latents [2C, h/f, w/f] (VAE posterior mean and log-variance),
    caption, time_ids [6], index}."""

    def __init__(self, data_dir: Path):
        data_dir = Path(data_dir)
        manifest = json.loads((data_dir / "manifest.json").read_text())
        root = data_dir / manifest.get("shards_dir", "shards")
        self.shards = []
        for entry in manifest["shards"]:
            index = TarIndex(root / entry["path"])
            if len(index) != entry["count"]:
                raise ValueError(
                    f"shard {entry['path']} holds {len(index)} samples, the manifest says {entry['count']}:"
                    " the shard is truncated or was changed; rerun the stage that wrote it"
                )
            self.shards.append(index)
        counts = np.array([len(index) for index in self.shards], dtype=np.int64)
        # Sample i is sample locations[i, 1] of shard locations[i, 0] (arrays: millions of samples).
        shard_of = np.repeat(np.arange(len(counts)), counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        self.locations = np.stack([shard_of, np.arange(len(shard_of)) - first], axis=1)
        shard_buckets = np.array([entry["bucket"] for entry in manifest["shards"]]).reshape(-1, 2)
        bucket_of_shard = np.unique(shard_buckets, axis=0, return_inverse=True)[1].reshape(-1)
        self.bucket_ids = bucket_of_shard[shard_of]

    def __len__(self) -> int:
        return len(self.locations)

    @staticmethod
    def decode_pixels(raw: dict[str, bytes]) -> torch.Tensor:
        """A training sample's image as [3, h, w] floats in [-1, 1]."""
        image = next(raw[e] for e in ("png", "jpg", "webp") if e in raw)
        pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32)
        return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1

    def __getitem__(self, i: int) -> dict:
        shard, local = self.locations[i].tolist()
        raw = self.shards[shard][local]
        meta = json.loads(raw["json"])
        item = {
            "caption": raw["txt"].decode(),
            "time_ids": torch.tensor(meta["original_size"] + meta["crop_top_left"] + meta["target_size"]),
            "index": i,
        }
        if "latent.npy" in raw:
            latents = np.load(io.BytesIO(raw["latent.npy"]), allow_pickle=False)
            item["latents"] = torch.from_numpy(latents.astype(np.float32))
        else:
            item["pixels"] = self.decode_pixels(raw)
        return item


def collate(items: list[dict]) -> dict:
    batch = {
        "caption": [it["caption"] for it in items],
        "time_ids": torch.stack([it["time_ids"] for it in items]).float(),
        "index": torch.tensor([it["index"] for it in items]),
    }
    key = "latents" if "latents" in items[0] else "pixels"
    batch[key] = torch.stack([it[key] for it in items])
    return batch


def split_validation(num_samples: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a fixed random hold-out of `val_size` samples."""
    if val_size >= num_samples:
        raise ValueError(f"train.val_size={val_size} leaves no training data ({num_samples} samples)")
    order = np.random.default_rng([seed, 1]).permutation(num_samples)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def epoch_batches(
    indices: np.ndarray,
    bucket_ids: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    world_size: int,
    rank: int,
) -> list[list[int]]:
    """This rank's micro batches (lists of sample indices) for one epoch, in order."""
    if len(indices) < world_size:
        raise ValueError(f"{len(indices)} training samples cannot feed {world_size} ranks")
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for bucket in np.unique(bucket_ids[indices]):
        members = rng.permutation(indices[bucket_ids[indices] == bucket])
        batches += [members[i : i + batch_size].tolist() for i in range(0, len(members), batch_size)]
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda j: (len(batches[j]), -j))
        if len(batches[largest]) == 1:  # only single-sample batches left: nothing more to split
            del batches[len(batches) - len(batches) % world_size :]
            break
        batch = batches.pop(largest)
        batches += [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
    order = rng.permutation(len(batches))
    return [batches[j] for j in order[rank::world_size]]


def micro_batches(
    dataset: TrainingSet,
    indices: np.ndarray,
    batch_size: int,
    seed: int,
    world_size: int,
    rank: int,
    start: int,
    num_workers: int,
):
    """Yield (epoch, micro batch) forever, starting at this rank's micro-step `start`."""
    per_epoch = len(epoch_batches(indices, dataset.bucket_ids, batch_size, seed, 0, world_size, rank))
    epoch, skip = divmod(start, per_epoch)
    while True:
        batches = epoch_batches(indices, dataset.bucket_ids, batch_size, seed, epoch, world_size, rank)[skip:]
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0
