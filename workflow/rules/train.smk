rule train:
    """Flow-matching training with DeepSpeed. Resumes from checkpoints/latest when it exists: delete
    results/<run>/train/checkpoints to train from scratch."""
    input:
        base=f"{RESULTS}/base_model",
        manifest=f"{TRAIN_DATA}/manifest.json",
    output:
        summary=f"{RESULTS}/train/summary.json",
    log:
        f"{LOGS}/train.log",
    conda:
        ENV
    threads: workflow.cores
    params:
        config=CONFIG_SNAPSHOT,
        data=lambda wildcards, input: os.path.dirname(input.manifest),
        folder=lambda wildcards, output: os.path.dirname(output.summary),
        settings=config["train"],
        seed=config["seed"],
    shell:
        "nyaflow train --config {params.config:q} --base {input.base:q} --data {params.data:q}"
        " --out {params.folder:q} > {log:q} 2>&1"
