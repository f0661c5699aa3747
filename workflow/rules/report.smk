report: "../report/workflow.rst"


localrules:
    report,


rule report:
    """Plots and tables of the run for `snakemake --report report.html`: loss and validation-loss curves,
    throughput, the data accounting and the config (the sample rule adds its grids)."""
    input:
        summary=f"{RESULTS}/train/summary.json",
        manifest=f"{RESULTS}/data/manifest.json",
        scores=f"{RESULTS}/samples/scores.json",
        config=CONFIG_SNAPSHOT,
    output:
        loss=report(
            f"{RESULTS}/report/loss.png",
            caption="../report/loss.rst",
            category="Training",
        ),
        throughput=report(
            f"{RESULTS}/report/throughput.png",
            caption="../report/throughput.rst",
            category="Training",
        ),
        training=report(
            f"{RESULTS}/report/training.html",
            caption="../report/training.rst",
            category="Training",
        ),
        data=report(
            f"{RESULTS}/report/data.html",
            caption="../report/data.rst",
            category="Data",
        ),
        config=report(
            f"{RESULTS}/report/config.html",
            caption="../report/config.rst",
            category="Config",
        ),
    log:
        f"{LOGS}/report.log",
    conda:
        ENV
    params:
        train=lambda wildcards, input: os.path.dirname(input.summary),
        data=lambda wildcards, input: os.path.dirname(input.manifest),
        samples=lambda wildcards, input: os.path.dirname(input.scores),
        folder=lambda wildcards, output: os.path.dirname(output.loss),
    shell:
        "nyaflow report --config {input.config:q} --train {params.train:q} --data {params.data:q}"
        " --samples {params.samples:q} --out {params.folder:q} > {log:q} 2>&1"
