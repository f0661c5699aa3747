DEMO = config["data"]["source"] == "demo"
URL_TABLE = f"{RESOURCES}/demo/urls.parquet" if DEMO else config["data"]["table"]
PARTS = [f"part-{i:05d}" for i in range(config["data"]["download"]["parts"])]
PREFILTER = f"{RESOURCES}/prefilter"


wildcard_constraints:
    part=r"part-\d{5}",


rule demo_source:
    """Generate the synthetic demo images and their danbooru-shaped URL table (data.source: demo)."""
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


rule prefilter:
    """Drop unwanted rows of the URL table (URL scheme, rating, score, size, tags, duplicates) and split the
    rest into data.download.parts parts."""
    input:
        table=URL_TABLE,
    output:
        parts=expand(f"{PREFILTER}/{{part}}.parquet", part=PARTS),
        dropped=f"{PREFILTER}/dropped.parquet",
        summary=f"{PREFILTER}/summary.json",
    log:
        f"{LOGS}/prefilter.log",
    conda:
        ENV
    params:
        config=CONFIG_SNAPSHOT,
        folder=lambda wildcards, output: os.path.dirname(output.summary),
        settings={
            k: config["data"][k]
            for k in (
                "table_format",
                "base_url",
                "columns",
                "allowed_schemes",
                "prefilter",
            )
        },
        parts=config["data"]["download"]["parts"],
    shell:
        "nyaflow prefilter --config {params.config:q} --table {input.table:q} --out {params.folder:q}"
        " > {log:q} 2>&1"


rule download:
    """Download one part with img2dataset (resuming a killed run) and check every shard is complete; the demo
    images are served from 127.0.0.1 meanwhile."""
    input:
        part=f"{PREFILTER}/{{part}}.parquet",
        images=f"{RESOURCES}/demo/images" if DEMO else [],
    output:
        directory(f"{RESOURCES}/download/{{part}}"),
    log:
        f"{LOGS}/download/{{part}}.log",
    conda:
        ENV
    threads: config["data"]["download"]["processes"]
    params:
        config=CONFIG_SNAPSHOT,
        serve=lambda wildcards, input: ["--serve", input.images] if DEMO else [],
        # How fast a part downloads (processes, threads) does not change what it holds: no rerun for that.
        settings={
            k: v
            for k, v in config["data"]["download"].items()
            if k not in ("parts", "processes", "threads")
        },
        max_pixels=config["data"]["preprocess"]["max_pixels"],
    shell:
        "nyaflow download --config {params.config:q} --table {input.part:q} --out {output:q}"
        " {params.serve:q} > {log:q} 2>&1"


rule preprocess:
    """Decode, filter, bucket and reshard one downloaded part; record the fate of each of its rows."""
    input:
        part=f"{PREFILTER}/{{part}}.parquet",
        download=f"{RESOURCES}/download/{{part}}",
    output:
        shards=directory(f"{RESULTS}/data/shards/{{part}}"),
        rows=f"{RESULTS}/data/parts/{{part}}.parquet",
    log:
        f"{LOGS}/preprocess/{{part}}.log",
    conda:
        ENV
    threads: config["data"]["preprocess"]["processes"]
    params:
        config=CONFIG_SNAPSHOT,
        settings={
            k: v for k, v in config["data"]["preprocess"].items() if k != "processes"
        },
        captions={
            k: v
            for k, v in config["data"]["captions"].items()
            if k not in ("keep_first_n", "shuffle", "tag_dropout")
        },
    shell:
        "nyaflow preprocess --config {params.config:q} --table {input.part:q}"
        " --download {input.download:q} --shards {output.shards:q} --rows {output.rows:q}"
        " --processes {threads} > {log:q} 2>&1"


rule manifest:
    """Account for every row of the URL table (kept, prefiltered, failed download, filtered, lost) in
    manifest.json and rows.parquet."""
    input:
        dropped=f"{PREFILTER}/dropped.parquet",
        summary=f"{PREFILTER}/summary.json",
        parts=expand(f"{RESULTS}/data/parts/{{part}}.parquet", part=PARTS),
    output:
        manifest=f"{RESULTS}/data/manifest.json",
        rows=f"{RESULTS}/data/rows.parquet",
    log:
        f"{LOGS}/manifest.log",
    conda:
        ENV
    params:
        config=CONFIG_SNAPSHOT,
        prefilter=lambda wildcards, input: os.path.dirname(input.summary),
        folder=lambda wildcards, output: os.path.dirname(output.manifest),
    shell:
        "nyaflow manifest --config {params.config:q} --prefilter {params.prefilter:q}"
        " --parts {input.parts:q} --out {params.folder:q} > {log:q} 2>&1"
