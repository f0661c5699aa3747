LATENTS = config["latents"]
LATENT_PARTS = list(range(LATENTS["parts"]))
# What training reads: the cached latents when latents.cache is on, else the image shards.
TRAIN_DATA = f"{RESULTS}/latents" if LATENTS["cache"] else f"{RESULTS}/data"


rule cache_latents:
    """Encode one part of the training shards with the frozen VAE (one GPU job per part on SLURM)."""
    input:
        base=f"{RESULTS}/base_model",
        manifest=f"{RESULTS}/data/manifest.json",
    output:
        directory(f"{RESULTS}/latents/part-{{latent_part}}"),
    log:
        f"{LOGS}/cache_latents_{{latent_part}}.log",
    wildcard_constraints:
        latent_part=r"\d+",
    conda:
        ENV
    params:
        config=CONFIG_SNAPSHOT,
        data=lambda wildcards, input: os.path.dirname(input.manifest),
        parts=LATENTS["parts"],
        settings=LATENTS,
    shell:
        "nyaflow cache-latents --config {params.config:q} --base {input.base:q} --data {params.data:q}"
        " --part {wildcards.latent_part} --parts {params.parts} --out {output:q} > {log:q} 2>&1"


rule gather_latents:
    """Check every cached part and write the latent manifest that training reads."""
    input:
        parts=expand(f"{RESULTS}/latents/part-{{p}}", p=LATENT_PARTS),
        manifest=f"{RESULTS}/data/manifest.json",
    output:
        f"{RESULTS}/latents/manifest.json",
    log:
        f"{LOGS}/gather_latents.log",
    conda:
        ENV
    params:
        config=CONFIG_SNAPSHOT,
        data=lambda wildcards, input: os.path.dirname(input.manifest),
        folder=lambda wildcards, output: os.path.dirname(output[0]),
        parts=LATENTS["parts"],
    shell:
        "nyaflow gather-latents --config {params.config:q} --data {params.data:q} --out {params.folder:q}"
        " --parts {params.parts} > {log:q} 2>&1"
