"""Latent caching: cached shards hold the VAE posterior of each training sample, and training on them gives
the same loss as training on the images."""

import json

import torch
from conftest import make_config

from nyaflow.latents import cache_part, gather
from nyaflow.loader import TrainingSet, collate


def test_cached_latents_train_like_the_images(tiny_model, demo_data, tmp_path):
    from nyaflow.model import load_components
    from nyaflow.train import FlowObjective

    _, data_dir, manifest, _ = demo_data
    parts = 2
    done = sum(cache_part(tiny_model, data_dir, tmp_path / f"part-{p}", p, parts, 5) for p in range(parts))
    assert done == sum(s["count"] for s in manifest["shards"])
    cached = gather(data_dir, tmp_path, parts)
    assert json.loads((tmp_path / "manifest.json").read_text()) == cached

    images, latents = TrainingSet(data_dir), TrainingSet(tmp_path)
    assert len(images) == len(latents)
    by_key = {ds.shards[s].keys[i]: n for n, (s, i) in enumerate(latents.locations) for ds in [latents]}
    c = load_components(tiny_model)
    objective = FlowObjective(
        c, make_config(train={"caption_dropout": 0.0})["train"], torch.device("cpu"), torch.float32
    )
    for n in range(0, len(images), 7):
        shard, i = images.locations[n]
        a, b = images[n], latents[by_key[images.shards[shard].keys[i]]]
        assert a["caption"] == b["caption"] and torch.equal(a["time_ids"], b["time_ids"])
        assert b["latents"].shape[0] == 2 * c.vae.config.latent_channels
        # The same posterior sample (up to the fp16 storage of its parameters) from either kind of shard.
        za = objective.latents(collate([a]), torch.Generator().manual_seed(n))
        zb = objective.latents(collate([b]), torch.Generator().manual_seed(n))
        assert torch.allclose(za, zb, atol=2e-2, rtol=1e-2)
        la = objective.loss(c.unet, collate([a]), torch.Generator().manual_seed(n))
        lb = objective.loss(c.unet, collate([b]), torch.Generator().manual_seed(n))
        assert abs(la.item() - lb.item()) < 1e-2 * la.item()


def test_dag_caches_latents_in_parts_when_asked(workdir):
    import yaml
    from conftest import run_snakemake

    cfg = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    cfg["latents"] = {"cache": True, "parts": 3}
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    plan = run_snakemake(workdir, "-n", "--cores", "2")
    assert plan.returncode == 0, plan.stderr[-2000:]
    jobs = plan.stdout
    assert "cache_latents" in jobs and "gather_latents" in jobs
    assert all(f"results/demo/latents/part-{p}" in jobs for p in range(3))
