"""Sampling: nyaflow's flow Euler sampler against the diffusers pipeline, determinism, grids, prompt files,
sweeps, and clear messages for bad input. CPU, fp32, on the tiny model."""

import json

import numpy as np
import pytest
import torch
from conftest import make_config
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from nyaflow.cli import main as cli_main
from nyaflow.model import load_components
from nyaflow.sample import (
    Prompt,
    SampleError,
    check_prompt_lengths,
    decode,
    labelled_grid,
    parse_prompt,
    prompts_from_config,
    read_prompt_file,
    sample,
    sample_latents,
    sample_stage,
)
from nyaflow.scheduler import FlowMatchEulerSDXLScheduler

# Our sampler and StableDiffusionXLPipeline + FlowMatchEulerSDXLScheduler run the same operations in the
# same order on CPU in fp32: measured here, their latents are bit-identical. The tolerance allows for BLAS
# differences between machines; decoded 8-bit pixels may then differ by one level.
LATENT_ATOL = 1e-5
PIXEL_ATOL = 1


@pytest.fixture(scope="module")
def components(tiny_model):
    return load_components(tiny_model)


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    scheduler = FlowMatchEulerSDXLScheduler.from_pretrained(tiny_model, subfolder="scheduler", shift=3.0)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, scheduler=scheduler, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "prompt,guidance",
    [
        (Prompt("red circle, blue background, solo"), 4.0),  # empty negative: zero embeddings
        (Prompt("yellow square, solo", "blue background, blurry"), 4.0),  # a negative prompt
        (Prompt("green triangle, red background"), 1.0),  # no guidance: conditional branch only
    ],
)
def test_sampler_matches_diffusers_pipeline(components, pipeline, prompt, guidance):
    seeds, steps, shift = [3, 0], 5, 3.0
    assert pipeline.scheduler.config.shift == shift
    theirs = pipeline(
        prompt.text,
        negative_prompt=prompt.negative or None,  # None: zero embeddings, as nyaflow's empty negative
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=64,
        width=64,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).images
    ours = sample_latents(components, [prompt], seeds, steps, guidance, shift, 64, 64)
    assert ours.shape == theirs.shape == (2, 4, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=LATENT_ATOL, rtol=0)
    with torch.no_grad():
        decoded = pipeline.vae.decode(theirs / pipeline.vae.config.scaling_factor).sample
    their_pixels = pipeline.image_processor.postprocess(decoded, output_type="pil")
    for a, b in zip(decode(components, ours), their_pixels, strict=True):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= PIXEL_ATOL


def test_sampling_is_deterministic_by_seed(components):
    prompts = ["red circle, blue background", Prompt("blue square", "purple background")]
    a = sample_latents(components, prompts, [0, 1, 2], 3, 3.0, 3.0, 64, 64, batch_size=4)
    b = sample_latents(components, prompts, [0, 1, 2], 3, 3.0, 3.0, 64, 64, batch_size=4)
    assert torch.equal(a, b)
    # An image depends on its seed only: not on the batch, nor on the other seeds.
    single = sample_latents(components, prompts[:1], [2], 3, 3.0, 3.0, 64, 64, batch_size=1)
    torch.testing.assert_close(single[0], a[2], atol=1e-5, rtol=0)
    swapped = sample_latents(components, prompts[1:], [2, 0], 3, 3.0, 3.0, 64, 64, batch_size=8)
    torch.testing.assert_close(swapped[1], a[3], atol=1e-5, rtol=0)
    assert (a[0] - a[1]).abs().max() > 0.1  # other seeds, other images


def test_grid_has_the_right_labels_and_size():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    images = [[Image.new("RGB", (64, 48), c) for c in row] for row in colours]
    grid = labelled_grid(images, ["first prompt", "second | neg: x"], ["seed 0", "seed 1", "seed 2"], "cfg 3")
    zoom = 3  # cells are at least 128 px: 48 -> 144
    assert grid.size == (200 + 3 * 64 * zoom, 20 + 2 * 48 * zoom)
    px = np.asarray(grid)
    for i, row in enumerate(colours):
        for j, colour in enumerate(row):
            y, x = 20 + i * 144 + 72, 200 + j * 192 + 96
            assert tuple(px[y, x]) == colour
    # Text: the corner, every column label and every row label put dark pixels where they belong.
    for j in range(3):
        assert (px[:20, 200 + j * 192 : 200 + (j + 1) * 192] < 128).any()
    for i in range(2):
        assert (px[20 + i * 144 : 20 + (i + 1) * 144, :200] < 128).any()
    assert (px[:20, :200] < 200).any()
    with pytest.raises(ValueError, match="one image per column label"):
        labelled_grid(images, ["a", "b"], ["seed 0"])


def test_prompt_file_and_negative_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# demo prompts\n\nred circle, blue background\n  yellow square | blurry, lowres  \n"
        "a | b | c\n   # indented comment\nlast one |\n"
    )
    assert read_prompt_file(path, default_negative="ugly") == [
        Prompt("red circle, blue background", "ugly"),
        Prompt("yellow square", "blurry, lowres"),
        Prompt("a", "b | c"),
        Prompt("last one", ""),
    ]
    assert parse_prompt("x|y") == Prompt("x|y")  # a bar without spaces is part of the prompt
    sc = make_config(sample={"prompt_file": str(path)})["sample"]
    assert prompts_from_config(sc)[1].negative == "blurry, lowres"
    sc = make_config(sample={"prompts": ["p1", "p2 | n2"], "negative_prompt": "n"})["sample"]
    assert prompts_from_config(sc) == [Prompt("p1", "n"), Prompt("p2", "n2")]
    assert Prompt("p2", "n2").label == "p2 | neg: n2"


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "has no prompts"),
        ("# only a comment\n\n   \n", "has no prompts"),
        ("fine\n | only a negative\n", "line 2: no prompt before"),
    ],
)
def test_bad_prompt_files_get_clear_messages(tmp_path, text, message):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(SampleError, match=message):
        read_prompt_file(path)
    with pytest.raises(SampleError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")


def test_prompt_longer_than_the_tokenizer_limit_is_refused(components):
    long = ", ".join(["red circle"] * 40)
    with pytest.raises(SampleError, match=r"tokens long, more than the 75 that the text encoders take"):
        check_prompt_lengths(components, [Prompt("red circle"), Prompt(long)])
    with pytest.raises(SampleError, match="tokens long"):
        check_prompt_lengths(components, [Prompt("red circle", negative=long)])
    check_prompt_lengths(components, [Prompt(", ".join(["red"] * 30))])  # within the limit: fine


def _config_file(tmp_path, **sample_settings):
    import yaml

    cfg = make_config(sample={"seeds": [0, 1], "steps": 2, **sample_settings})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


def test_sample_stage_writes_grid_sweeps_and_scores(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle, blue background\n# skipped\nyellow square | purple background\n")
    cfg, _ = _config_file(
        tmp_path,
        prompt_file=str(prompts),
        batch_size=3,
        sweep={"guidance": [5], "shift": [], "steps": [1]},
    )
    scores = sample_stage(cfg, tiny_model, tmp_path / "samples", base_dir=tiny_model)
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["grid.png", "grid_guidance-5.0.png", "grid_steps-1.png", "scores.json"]
    for name in names[:-1]:  # 2 seeds x 2 prompts, 64 px cells enlarged to 128
        assert Image.open(tmp_path / "samples" / name).size == (200 + 2 * 128, 20 + 2 * 128)
    assert json.loads((tmp_path / "samples" / "scores.json").read_text()) == scores
    # Only the first prompt names a background colour; the base model here is the same model.
    assert scores["colour_match_trained"] == scores["colour_match_untrained"]
    # The main grid's images are the sampler's images for those settings.
    c = load_components(tiny_model)
    rows = sample(c, [Prompt("red circle, blue background")], [0, 1], 2, 3.0, 3.0, 64, 64)
    grid = np.asarray(Image.open(tmp_path / "samples" / "grid.png"))
    cell = np.asarray(rows[0][1].resize((128, 128), Image.Resampling.NEAREST))
    assert np.array_equal(grid[20:148, 328:456], cell)


@pytest.mark.parametrize(
    "case,message",
    [
        ("empty prompt file", "has no prompts"),
        ("missing prompt file", "does not exist"),
        ("long prompt", "tokens long"),
        ("no model", "is not a diffusers model folder"),
    ],
)
def test_cli_reports_bad_input_in_one_line(tiny_model, tmp_path, capsys, case, message):
    settings, model = {}, tiny_model
    if case == "empty prompt file":
        (tmp_path / "empty.txt").write_text("# nothing\n")
        settings = {"prompt_file": str(tmp_path / "empty.txt")}
    elif case == "missing prompt file":
        settings = {"prompt_file": str(tmp_path / "nope.txt")}
    elif case == "long prompt":
        settings = {"prompts": ["solo, " * 60]}
    else:
        model = tmp_path / "no_model"
    _, config = _config_file(tmp_path, **settings)
    out = tmp_path / "s"
    status = cli_main(["sample", "--config", str(config), "--model", str(model), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    # Libraries may log progress bars and warnings first; the error is one line, and no traceback.
    assert err.splitlines()[-1].startswith("nyaflow sample: ") and message in err.splitlines()[-1]
    assert "Traceback" not in err
    assert not (out / "grid.png").exists()
