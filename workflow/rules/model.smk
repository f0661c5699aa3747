TINY_BASE = config["model"]["base"] == "tiny"


rule base_model:
    """Build the tiny SDXL-shaped model (fitting its VAE on the training images) or check a local base."""
    input:
        manifest=f"{RESULTS}/data/manifest.json" if TINY_BASE else [],
    output:
        directory(f"{RESULTS}/base_model"),
    log:
        f"{LOGS}/base_model.log",
    conda:
        ENV
    threads: workflow.cores
    params:
        config=CONFIG_SNAPSHOT,
        data=["--data", f"{RESULTS}/data"] if TINY_BASE else [],
        settings=config["model"],
        seed=config["seed"],
    shell:
        "nyaflow base-model --config {params.config:q} --out {output:q} {params.data:q} > {log:q} 2>&1"
