DEMO = config["data"]["source"] == "demo"
URL_TABLE = f"{RESOURCES}/demo/urls.parquet" if DEMO else config["data"]["table"]


rule demo_source:
    """Generate the synthetic demo images and their URL table (data.source: demo)."""
    output:
        table=f"{RESOURCES}/demo/urls.parquet",
        images=directory(f"{RESOURCES}/demo/images"),
    log:
        f"{LOGS}/demo_source.log",
    conda:
        ENV
    params:
        config=CONFIG_SNAPSHOT,
        folder=lambda wildcards, output: os.path.dirname(output.table),
        settings=config["data"]["demo"],
        seed=config["seed"],
    shell:
        "nyaflow demo-source --config {params.config:q} --out {params.folder:q} > {log:q} 2>&1"


rule download:
    """Download the URL table with img2dataset; the demo images are served from 127.0.0.1 meanwhile."""
    input:
        table=URL_TABLE,
        images=f"{RESOURCES}/demo/images" if DEMO else [],
    output:
        directory(f"{RESOURCES}/download"),
    log:
        f"{LOGS}/download.log",
    conda:
        ENV
    threads: config["data"]["download"]["processes"]
    params:
        config=CONFIG_SNAPSHOT,
        serve=lambda wildcards, input: ["--serve", input.images] if DEMO else [],
        settings={
            k: config["data"][k]
            for k in ("download", "url_col", "caption_col", "allowed_schemes")
        },
    shell:
        "nyaflow download --config {params.config:q} --table {input.table:q} --out {output:q}"
        " {params.serve:q} > {log:q} 2>&1"


rule preprocess:
    """Filter, bucket and reshard the downloaded images; account for every input row in the manifest."""
    input:
        table=URL_TABLE,
        download=f"{RESOURCES}/download",
    output:
        manifest=f"{RESULTS}/data/manifest.json",
        rows=f"{RESULTS}/data/rows.parquet",
        shards=directory(f"{RESULTS}/data/shards"),
    log:
        f"{LOGS}/preprocess.log",
    conda:
        ENV
    params:
        config=CONFIG_SNAPSHOT,
        folder=lambda wildcards, output: os.path.dirname(output.manifest),
        settings=config["data"]["preprocess"],
    threads: workflow.cores
    shell:
        "nyaflow preprocess --config {params.config:q} --table {input.table:q}"
        " --download {input.download:q} --out {params.folder:q} --processes {threads}"
        " > {log:q} 2>&1"
