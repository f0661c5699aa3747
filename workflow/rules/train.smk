from nyaflow.launch import describe

LAUNCH = config["launch"]
PREFLIGHT = f"{RESULTS}/preflight/report.json"

# launch.backend: slurm -> the rule runs on the login node (where Snakemake runs) and submits one multi-node
# job with submitit, then waits for it. launch.backend: local -> the rule trains in its own process: on this
# machine with cluster/local, or as one ordinary cluster job (one GPU) with cluster/slurm.
if LAUNCH["backend"] == "slurm":

    localrules:
        preflight,
        train,


rule preflight:
    """Check the allocation before training, on the training job's shape (nyaflow/preflight.py): every rank
    sees its GPU, matmul rate, all-reduce bus bandwidth, data read rate; a slow node fails the rule by name.
    Runs once, right before the first training launch (after the data and the base model are ready);
    `--forcerun preflight --until preflight` checks again."""
    input:
        base=f"{RESULTS}/base_model",
        manifest=f"{TRAIN_DATA}/manifest.json",
    output:
        report=PREFLIGHT,
        html=report(
            f"{RESULTS}/preflight/report.html",
            caption="../report/preflight.rst",
            category="Preflight",
        ),
    log:
        f"{LOGS}/preflight.log",
    retries: 0
    conda:
        ENV
    threads: workflow.cores
    params:
        config=CONFIG_SNAPSHOT,
        data=lambda wildcards, input: os.path.dirname(input.manifest),
        folder=lambda wildcards, output: os.path.dirname(output.report),
        submitit=f"{LOGS}/submitit-preflight",
        settings=config["preflight"],
    message:
        f"preflight {RUN}: {describe(config, 'preflight')}"
    shell:
        "nyaflow preflight --config {params.config:q} --data {params.data:q} --out {params.folder:q}"
        " --submitit-folder {params.submitit:q} --log {log:q}"


rule train:
    """Flow-matching training with DeepSpeed, launched as launch.backend says (nyaflow/launch.py). Resumes
    from checkpoints/latest when it exists: delete results/<run>/train/checkpoints to train from scratch.
    """
    input:
        base=f"{RESULTS}/base_model",
        manifest=f"{TRAIN_DATA}/manifest.json",
        # ancient: a preflight run again (--forcerun preflight) does not make training start over
        preflight=ancient(PREFLIGHT) if config["preflight"]["enabled"] else [],
    output:
        summary=f"{RESULTS}/train/summary.json",
    log:
        f"{LOGS}/train.log",
    # No automatic retry: the launch requeues the job itself (launch.max_requeues); a failure needs a look.
    retries: 0
    conda:
        ENV
    threads: workflow.cores
    params:
        config=CONFIG_SNAPSHOT,
        data=lambda wildcards, input: os.path.dirname(input.manifest),
        folder=lambda wildcards, output: os.path.dirname(output.summary),
        submitit=f"{LOGS}/submitit",
        settings=config["train"],
        seed=config["seed"],
    message:
        f"train {RUN}: {describe(config)}"
    shell:
        "nyaflow launch-train --config {params.config:q} --base {input.base:q} --data {params.data:q}"
        " --out {params.folder:q} --submitit-folder {params.submitit:q} --log {log:q}"
