from nyaflow.report import sample_grids

# grid.png, then one per value of sample.sweep (nyaflow.report.sample_grids names them)
SAMPLE_GRIDS = list(sample_grids(config["sample"]))
PROMPT_FILE = config["sample"]["prompt_file"]


rule sample:
    """Sample the exported model: a labelled grid of prompts x seeds, one more grid per value of
    sample.sweep, and (for the demo) how well the samples show the colour their prompt names, beside the
    untrained base model's score.
    """
    input:
        model=f"{RESULTS}/export/diffusers",
        base=f"{RESULTS}/base_model",
        prompts=PROMPT_FILE or [],
    output:
        grid=report(
            f"{RESULTS}/samples/grid.png",
            caption="../report/grid.rst",
            category="Samples",
            labels={"grid": "main"},
        ),
        sweeps=[
            report(
                f"{RESULTS}/samples/{name}",
                caption="../report/sweep.rst",
                category="Samples",
                labels={"grid": name.removeprefix("grid_").removesuffix(".png")},
            )
            for name in SAMPLE_GRIDS[1:]
        ],
        scores=f"{RESULTS}/samples/scores.json",
    log:
        f"{LOGS}/sample.log",
    conda:
        ENV
    params:
        config=CONFIG_SNAPSHOT,
        folder=lambda wildcards, output: os.path.dirname(output.grid),
        settings=config["sample"],
    shell:
        "nyaflow sample --config {params.config:q} --model {input.model:q} --base {input.base:q}"
        " --out {params.folder:q} > {log:q} 2>&1"
