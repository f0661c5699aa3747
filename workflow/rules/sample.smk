rule sample:
    """Sample the exported model: a labelled grid of prompts x seeds (and, for the demo, how well the
    samples show the colour their prompt names, beside the untrained base model's score).
    """
    input:
        model=f"{RESULTS}/export/diffusers",
        base=f"{RESULTS}/base_model",
    output:
        grid=report(
            f"{RESULTS}/samples/grid.png",
            caption="../report/grid.rst",
            category="Samples",
        ),
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
