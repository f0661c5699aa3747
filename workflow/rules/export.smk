rule export:
    """Export the latest checkpoint: a diffusers folder and a single-file SDXL checkpoint."""
    input:
        base=f"{RESULTS}/base_model",
        summary=f"{RESULTS}/train/summary.json",
    output:
        diffusers=directory(f"{RESULTS}/export/diffusers"),
        single_file=f"{RESULTS}/export/{RUN}.safetensors",
    log:
        f"{LOGS}/export.log",
    conda:
        ENV
    params:
        config=CONFIG_SNAPSHOT,
        checkpoints=f"{RESULTS}/train/checkpoints",
        folder=lambda wildcards, output: os.path.dirname(output.single_file),
        settings=config["export"],
    shell:
        "nyaflow export --config {params.config:q} --base {input.base:q} --checkpoints {params.checkpoints:q}"
        " --train-summary {input.summary:q} --out {params.folder:q} > {log:q} 2>&1"
