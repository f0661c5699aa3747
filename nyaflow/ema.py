"""The exponential moving average of the UNet weights, split across the ranks.

Under ZeRO-2 every rank holds the whole bf16 UNet, so every rank can average any of its tensors without
communication. Each rank averages only its share: the UNet's parameters are dealt out by size (largest
first, to the least loaded rank), the same way on every rank, so rank r keeps about 1/world_size of the
average: 0.3 GB of SDXL's 10 GB on 32 ranks instead of 10 GB each. Each rank saves its share as
`ema_rank<r>.safetensors` in the checkpoint folder (named fp32 tensors); the export stage merges the files.

The average is fp32 whatever the training precision: an update moves it by (1 - decay) times its distance
to the weights, 1e-4 of it at decay 0.9999, far below bf16's resolution (2^-8 relative), so a bf16 average
would never leave the base weights. It averages the working weights (bf16 on GPU). The update itself is
diffusers' EMAModel (its decay warm-up included), one tensor at a time: its foreach path allocates a
temporary the size of the whole average every step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILE = "ema_rank{rank:03d}.safetensors"
FILES = "ema_rank*.safetensors"


def share(module: torch.nn.Module, rank: int, world_size: int) -> list[str]:
    """The names of the parameters whose average `rank` keeps (in the module's order)."""
    load, owner = [0] * world_size, {}
    sizes = sorted(((p.numel(), name) for name, p in module.named_parameters()), key=lambda t: (-t[0], t[1]))
    for numel, name in sizes:
        r = min(range(world_size), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += numel
    return [name for name, _ in module.named_parameters() if owner[name] == rank]


class ShardedEMA:
    """This rank's share of the EMA of `module`'s parameters, started from their current values (fp32)."""

    def __init__(self, module: torch.nn.Module, decay: float, rank: int, world_size: int, device):
        from diffusers.training_utils import EMAModel

        self.rank, self.names = rank, share(module, rank, world_size)
        params = dict(module.named_parameters())
        self.model = EMAModel([params[n].detach().float() for n in self.names], decay=decay, foreach=False)
        self.model.to(device=device)

    def step(self, module: torch.nn.Module) -> None:
        """One update towards `module`'s current weights (call after every optimizer step)."""
        params = dict(module.named_parameters())
        self.model.step([params[n] for n in self.names])

    def state_dict(self) -> dict[str, torch.Tensor]:
        shadows = zip(self.names, self.model.shadow_params, strict=True)
        return {name: shadow.detach().float().cpu().contiguous() for name, shadow in shadows}

    def save(self, folder: Path) -> None:
        """Write this rank's share into checkpoint folder `folder`."""
        save_file(self.state_dict(), Path(folder) / FILE.format(rank=self.rank))

    def load(self, folder: Path, optimization_step: int) -> bool:
        """Read this rank's share from checkpoint folder `folder`; False when it has none."""
        path = Path(folder) / FILE.format(rank=self.rank)
        if not path.is_file():
            return False
        saved = load_file(path)
        missing = sorted(set(self.names) - set(saved))
        if missing:
            raise ValueError(f"{path} lacks the EMA of {len(missing)} parameters, e.g. {missing[0]}")
        for name, shadow in zip(self.names, self.model.shadow_params, strict=True):
            shadow.copy_(saved[name])
        self.model.optimization_step = optimization_step
        return True

    def restart_from(self, module: torch.nn.Module) -> None:
        """Start the average over from `module`'s current weights (a checkpoint written without EMA)."""
        params = dict(module.named_parameters())
        for name, shadow in zip(self.names, self.model.shadow_params, strict=True):
            shadow.copy_(params[name].detach())
        self.model.optimization_step = 0

    @property
    def optimization_step(self) -> int:
        return self.model.optimization_step


def read(folder: Path) -> dict[str, torch.Tensor]:
    """The whole EMA from a checkpoint folder: every rank's share merged ({} when there is none)."""
    merged: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob(FILES)):
        part = load_file(path)
        overlap = merged.keys() & part.keys()
        if overlap:
            raise ValueError(f"{path} repeats the EMA of {sorted(overlap)[0]}: the folder mixes two runs")
        merged |= part
    return merged
