from nyaflow.base_model import base_kind, hub_folder

BASE = config["model"]["base"]
BASE_KIND = base_kind(BASE)
# The hub repository to fetch: the base itself, or the configs that describe a single-file base.
HUB_REPO = {"hub": BASE, "single_file": config["model"]["base_config"]}.get(BASE_KIND)
if HUB_REPO and base_kind(HUB_REPO) != "hub":
    HUB_REPO = None  # model.base_config is a local folder
BASE_SOURCE = {
    "hub": hub_folder(BASE),
    "single_file": hub_folder(HUB_REPO) if HUB_REPO else config["model"]["base_config"],
}.get(BASE_KIND)


localrules:
    fetch_base,


rule fetch_base:
    """Download the base model (or a single file's configs) from the Hugging Face hub, once. A local rule:
    it runs where the workflow runs (the login node), so compute jobs never need the network.
    """
    output:
        directory(hub_folder(HUB_REPO) if HUB_REPO else "resources/hub/unused"),
    log:
        f"{LOGS}/fetch_base.log",
    conda:
        ENV
    params:
        config=CONFIG_SNAPSHOT,
    shell:
        "nyaflow fetch-base --config {params.config:q} --out {output:q} > {log:q} 2>&1"


rule base_model:
    """Build the tiny SDXL-shaped model (fitting its VAE on the training images), link a local or fetched
    diffusers folder, or convert a single-file checkpoint."""
    input:
        manifest=f"{RESULTS}/data/manifest.json" if BASE_KIND == "tiny" else [],
        source=BASE_SOURCE or [],
        single_file=BASE if BASE_KIND == "single_file" else [],
    output:
        directory(f"{RESULTS}/base_model"),
    log:
        f"{LOGS}/base_model.log",
    conda:
        ENV
    threads: workflow.cores
    params:
        config=CONFIG_SNAPSHOT,
        data=lambda wildcards, input: (
            ["--data", os.path.dirname(input.manifest)] if input.manifest else []
        ),
        source=lambda wildcards, input: (
            ["--source", input.source] if input.source else []
        ),
        settings=config["model"],
        seed=config["seed"],
    shell:
        "nyaflow base-model --config {params.config:q} --out {output:q} {params.data:q} {params.source:q}"
        " > {log:q} 2>&1"
