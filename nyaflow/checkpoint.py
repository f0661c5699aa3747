"""Training checkpoints: DeepSpeed engine state plus nyaflow's own state, saved by all ranks together.

Layout in the checkpoint folder: `step00001000/` (one DeepSpeed checkpoint per tag) and `latest`, a text
file naming the newest complete tag. A checkpoint is written as `<tag>.partial/` by every rank, then,
after a barrier, renamed to `<tag>/` by rank 0, and only then is `latest` replaced (write a temporary file,
rename it). A process killed at any moment therefore leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from nyaflow.errors import UserError

LATEST = "latest"
INFO = "nyaflow.json"  # step and world size, readable without loading the checkpoint


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(folder: Path) -> str | None:
    """The tag `latest` names, or None when there is no complete checkpoint yet."""
    path = Path(folder) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (Path(folder) / tag).is_dir():
        raise FileNotFoundError(f"{path} names {tag}, which does not exist (the folder was changed)")
    return tag


def save(
    engine,
    folder: Path,
    step: int,
    client_state: dict,
    keep: int,
    data_order: dict,
    write_rank_files: Callable[[Path], None] | None = None,
) -> str:
    """Save collectively (call on every rank); returns the tag. Keeps the newest `keep` checkpoints.
    `data_order`: the settings the data position depends on (see `load`), stored in the info file.
    `write_rank_files(checkpoint folder)`: each rank's own files (its EMA share), written with the rest."""
    folder, tag = Path(folder), tag_for(step)
    rank = dist.get_rank()
    # A stop right after resuming: `latest` already holds this very state, and writing it again would first
    # delete the one complete checkpoint. Rank 0 decides for all (a network file system may show another
    # rank an older `latest`; ranks that disagreed would wait for each other forever).
    decision = [latest_tag(folder) == tag if rank == 0 else None]
    dist.broadcast_object_list(decision, src=0)
    if decision[0]:
        return tag
    if rank == 0:  # leftovers of a save that was killed
        for stale in folder.glob("step*.partial"):
            shutil.rmtree(stale)
    dist.barrier()
    engine.save_checkpoint(str(folder), tag=f"{tag}.partial", client_state=client_state, save_latest=False)
    if write_rank_files is not None:
        write_rank_files(folder / f"{tag}.partial")
    dist.barrier()
    if rank == 0:
        info = {"step": step, "world_size": dist.get_world_size(), "data_order": data_order}
        (folder / f"{tag}.partial" / INFO).write_text(json.dumps(info))
        shutil.rmtree(folder / tag, ignore_errors=True)
        os.replace(folder / f"{tag}.partial", folder / tag)
        pointer = folder / f"{LATEST}.tmp"
        pointer.write_text(tag)
        os.replace(pointer, folder / LATEST)
        complete = sorted(p for p in folder.glob("step*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in complete[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return tag


def load(engine, folder: Path, data_order: dict) -> dict | None:
    """Load the `latest` checkpoint into the engine (every rank); returns its client state, or None.

    A checkpoint written by another number of ranks is refused (ZeRO partitions and the data order depend
    on the world size), and so is one whose `data_order` settings differ (the seed, micro batch, held-out
    size and number of samples fix which batches come next): resuming would silently see other data.
    Other settings (train.steps, the learning rate, ...) may change between runs."""
    tag = latest_tag(folder)
    if tag is None:
        return None
    info = json.loads((Path(folder) / tag / INFO).read_text())
    saved = info["world_size"]
    if saved != dist.get_world_size():
        raise UserError(
            f"{Path(folder) / tag} was written by {saved} ranks and this run has {dist.get_world_size()}:"
            " resume with the same number of ranks, or start a new run folder"
        )
    saved_order = info.get("data_order", data_order)
    changed = [f"{k} {saved_order.get(k)} -> {v}" for k, v in data_order.items() if saved_order.get(k) != v]
    if changed:
        raise UserError(
            f"{Path(folder) / tag} was trained with other data-order settings ({', '.join(changed)}): the"
            " resumed run would not see the batches that come next. Restore them, or start a new run"
            " (another `run` name, or delete the checkpoints folder)"
        )
    path, client_state = engine.load_checkpoint(str(folder), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(folder) / tag}")
    return client_state
