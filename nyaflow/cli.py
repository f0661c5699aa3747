"""The `nyaflow` command: one subcommand per pipeline stage. Snakemake rules call these.

Every subcommand takes `--config`, a config file that is validated against the schema (defaults filled);
the workflow passes results/<run>/config.yaml, the validated snapshot of its config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nyaflow import config as config_mod
from nyaflow.errors import UserError


def cmd_demo_source(cfg: dict, args) -> None:
    from nyaflow.demo_data import make_demo_source

    demo = cfg["data"]["demo"]
    table = make_demo_source(args.out, demo["num_images"], demo["min_side"], demo["port"], cfg["seed"])
    print(f"demo source: {len(table)} rows in {args.out / 'urls.parquet'}")


def cmd_prefilter(cfg: dict, args) -> None:
    from nyaflow.prefilter import prefilter

    print(json.dumps(prefilter(cfg, args.table, args.out), indent=2))


def cmd_download(cfg: dict, args) -> None:
    from nyaflow.download import download_part

    print(json.dumps(download_part(cfg, args.table, args.out, serve_dir=args.serve), indent=2))


def cmd_preprocess(cfg: dict, args) -> None:
    from nyaflow.preprocess import STATUSES, preprocess_part

    rows = preprocess_part(cfg, args.table, args.download, args.shards, args.rows, processes=args.processes)
    print(json.dumps({s: int((rows["status"] == s).sum()) for s in STATUSES}, indent=2))


def cmd_manifest(cfg: dict, args) -> None:
    from nyaflow.preprocess import write_manifest

    manifest = write_manifest(cfg, args.prefilter, args.parts, args.out)
    print(json.dumps({k: manifest[k] for k in ("rows_in", "counts", "buckets")}, indent=2))


def cmd_base_model(cfg: dict, args) -> None:
    from nyaflow.base_model import build_base_model

    print(json.dumps(build_base_model(cfg, args.out, args.data, args.source), indent=2))


def cmd_fetch_base(cfg: dict, args) -> None:
    from nyaflow.base_model import base_kind, fetch

    kind = base_kind(cfg["model"]["base"])
    repo = cfg["model"]["base"] if kind == "hub" else cfg["model"]["base_config"]
    fetch(repo, args.out, configs_only=kind == "single_file")


def cmd_cache_latents(cfg: dict, args) -> None:
    from nyaflow.latents import cache_part

    n = cache_part(args.base, args.data, args.out, args.part, args.parts, cfg["latents"]["batch_size"])
    print(f"cached the latents of {n} samples in {args.out}")


def cmd_gather_latents(cfg: dict, args) -> None:
    from nyaflow.latents import gather

    print(f"{len(gather(args.data, args.out, args.parts)['shards'])} latent shards in {args.out}")


def cmd_train(cfg: dict, args) -> int:
    from nyaflow.launch import train_here

    return train_here(cfg, args.base, args.data, args.out)


def cmd_launch_train(cfg: dict, args) -> int:
    from nyaflow.launch import launch_train

    return launch_train(cfg, args.base, args.data, args.out, args.submitit_folder, args.log)


def cmd_preflight(cfg: dict, args) -> int:
    from nyaflow.launch import launch_preflight

    return launch_preflight(cfg, args.data, args.out, args.submitit_folder, args.log)


def cmd_export(cfg: dict, args) -> None:
    from nyaflow.export import export

    export(cfg, args.base, args.checkpoints, args.train_summary, args.out, tag=args.tag, weights=args.weights)


def cmd_sample(cfg: dict, args) -> None:
    from nyaflow.sample import sample_stage

    print(json.dumps(sample_stage(cfg, args.model, args.out, args.base), indent=2))


def cmd_report(cfg: dict, args) -> None:
    from nyaflow.report import write_report

    for path in write_report(cfg, args.train, args.data, args.samples, args.out):
        print(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nyaflow", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="STAGE")
    docs = sub.add_parser("config-docs", help="print the configuration reference (config/README.md)")
    docs.set_defaults(func=None)

    def stage(name: str, func, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help)
        s.add_argument("--config", type=Path, required=True, help="config file (the workflow's snapshot)")
        s.set_defaults(func=func)
        return s

    s = stage("demo-source", cmd_demo_source, "generate the synthetic demo images and their URL table")
    s.add_argument("--out", type=Path, required=True, help="folder for images/ and urls.parquet")

    s = stage("prefilter", cmd_prefilter, "drop unwanted rows of the URL table and split the rest into parts")
    s.add_argument("--table", type=Path, required=True, help="URL table (parquet, csv or jsonl)")
    s.add_argument("--out", type=Path, required=True, help="folder for part-NNNNN.parquet, dropped.parquet")

    s = stage("download", cmd_download, "download one part with img2dataset into checked webdataset shards")
    s.add_argument("--table", type=Path, required=True, help="a part table written by the prefilter")
    s.add_argument("--out", type=Path, required=True, help="output folder (resumes from <out>.partial)")
    s.add_argument("--serve", type=Path, help="serve this folder on 127.0.0.1:data.demo.port meanwhile")

    s = stage("preprocess", cmd_preprocess, "decode, filter, bucket and reshard one downloaded part")
    s.add_argument("--table", type=Path, required=True, help="the part table that was downloaded")
    s.add_argument("--download", type=Path, required=True, help="the part's download folder")
    s.add_argument("--shards", type=Path, required=True, help="folder for the part's training shards")
    s.add_argument("--rows", type=Path, required=True, help="parquet file for the fate of the part's rows")
    s.add_argument("--processes", type=int, default=1, help="worker processes (one downloaded shard each)")

    s = stage("manifest", cmd_manifest, "account for every input row: write manifest.json and rows.parquet")
    s.add_argument("--prefilter", type=Path, required=True, help="the prefilter's folder")
    s.add_argument("--parts", type=Path, nargs="+", required=True, help="every part's rows (parquet)")
    s.add_argument("--out", type=Path, required=True, help="data folder (manifest.json, rows.parquet)")

    s = stage("base-model", cmd_base_model, "build (tiny) or check (local folder) the base model")
    s.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    s.add_argument("--data", type=Path, help="data folder (the tiny model fits its VAE on it)")
    s.add_argument("--source", type=Path, help="fetched hub folder, or the config folder of a single file")

    s = stage("fetch-base", cmd_fetch_base, "download model.base (or model.base_config) from the hub")
    s.add_argument("--out", type=Path, required=True, help="folder to write (resources/hub/<owner>--<name>)")

    s = stage("cache-latents", cmd_cache_latents, "encode one part of the training shards with the VAE")
    s.add_argument("--base", type=Path, required=True, help="base model diffusers folder")
    s.add_argument("--data", type=Path, required=True, help="data folder (manifest.json, shards/)")
    s.add_argument("--part", type=int, required=True, help="this part's number, 0 <= part < parts")
    s.add_argument("--parts", type=int, required=True, help="number of parts (shard i: part i mod parts)")
    s.add_argument("--out", type=Path, required=True, help="folder for this part's latent shards")

    s = stage("gather-latents", cmd_gather_latents, "check the cached parts and write the latent manifest")
    s.add_argument("--data", type=Path, required=True, help="data folder (manifest.json)")
    s.add_argument("--parts", type=int, required=True, help="number of parts")
    s.add_argument("--out", type=Path, required=True, help="latents folder (part-*/, manifest.json)")

    def training_arguments(s: argparse.ArgumentParser) -> None:
        s.add_argument("--base", type=Path, required=True, help="base model diffusers folder")
        s.add_argument("--data", type=Path, required=True, help="data folder")
        s.add_argument(
            "--out", type=Path, required=True, help="train folder (checkpoints/, tb/, summary.json)"
        )

    def launch_arguments(s: argparse.ArgumentParser) -> None:
        s.add_argument(
            "--submitit-folder", type=Path, required=True, help="submitit's folder: job pickles and rank logs"
        )
        s.add_argument(
            "--log", type=Path, help="the rule's log: this process's output, job states, rank 0's output"
        )

    s = stage("train", cmd_train, "flow-matching training with DeepSpeed (resumes from checkpoints/latest)")
    training_arguments(s)
    s = stage(
        "launch-train",
        cmd_launch_train,
        "train as launch.backend says: in this process, or as one multi-node SLURM job (submitit) that it"
        " waits for",
    )
    training_arguments(s)
    launch_arguments(s)
    s = stage(
        "preflight",
        cmd_preflight,
        "check the training allocation before training (GPUs, matmul rate, all-reduce bandwidth, data read"
        " rate), on the training job's shape, launched as launch.backend says",
    )
    s.add_argument("--data", type=Path, required=True, help="training data folder (as for launch-train)")
    s.add_argument("--out", type=Path, required=True, help="preflight folder (report.json, report.html)")
    launch_arguments(s)

    s = stage("export", cmd_export, "export a checkpoint as a diffusers folder and a single SDXL file")
    s.add_argument("--base", type=Path, required=True, help="base model diffusers folder")
    s.add_argument("--checkpoints", type=Path, required=True, help="DeepSpeed checkpoint folder")
    s.add_argument("--train-summary", type=Path, required=True, help="the train stage's summary.json")
    s.add_argument("--tag", help="checkpoint tag (default: export.tag, else the one `latest` names)")
    s.add_argument("--weights", choices=["raw", "ema"], help="raw or EMA weights (default: export.weights)")
    s.add_argument("--out", type=Path, required=True, help="export folder")

    s = stage("sample", cmd_sample, "render the labelled sample grid of prompts x seeds")
    s.add_argument("--model", type=Path, required=True, help="exported diffusers folder")
    s.add_argument("--base", type=Path, help="also score the untrained base model (demo)")
    s.add_argument("--out", type=Path, required=True, help="samples folder (grid.png, scores.json)")

    s = stage("report", cmd_report, "plots and tables of the run for `snakemake --report`")
    s.add_argument("--train", type=Path, required=True, help="train folder (summary.json, metrics.jsonl)")
    s.add_argument("--data", type=Path, required=True, help="data folder (manifest.json)")
    s.add_argument("--samples", type=Path, help="samples folder (scores.json)")
    s.add_argument("--out", type=Path, required=True, help="report folder")

    # Tools outside the DAG: they take their own options (plan reads --configfile itself).
    from nyaflow import bench, plan

    b = sub.add_parser("bench", help="benchmarks (nyaflow bench train --help)")
    bench_sub = b.add_subparsers(dest="bench", required=True, metavar="WHAT")
    help = "time nyaflow's training step (DeepSpeed, flow loss) on synthetic latents; FLOPs and MFU"
    s = bench_sub.add_parser("train", help=help, description=help)
    bench.add_arguments(s)
    s.set_defaults(func=None, tool=bench.main)
    help = "predict images/s, epoch time and GPU-hours of a config on a cluster"
    s = sub.add_parser("plan", help=help, description=help)
    plan.add_arguments(s)
    s.set_defaults(func=None, tool=plan.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "config-docs":
        print(config_mod.reference_markdown(), end="")
        return 0
    if getattr(args, "tool", None):
        try:
            return args.tool(args) or 0
        except (UserError, config_mod.ConfigError, FileNotFoundError) as e:
            print(f"nyaflow {args.command}: {e}", file=sys.stderr)
            return 2
    try:
        cfg = config_mod.load(args.config)
    except (config_mod.ConfigError, FileNotFoundError) as e:
        print(f"nyaflow {args.command}: {e}", file=sys.stderr)
        return 2
    try:
        return args.func(cfg, args) or 0
    except UserError as e:  # bad input, not a bug: one line that names it, no traceback
        print(f"nyaflow {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
