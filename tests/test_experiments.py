"""The experiment scripts: variants, configs, and end-to-end runs on tiny budgets."""

import csv
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from experiments import attention_ablation, common, demo, dense, density, invertibility
from flowattn.nn import baselines as ordinary

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = sorted((ROOT / "experiments/configs").glob("*/*.toml"))


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("variant", [v for v in invertibility.ORDINARY if v != "cbam"])
def test_ordinary_blocks_made_residual_are_the_blocks(variant):
    # The step x + g(x) with g = block - identity is the block itself (its own skip).
    step = invertibility.build_step(variant, 8, 0.9)
    for p in step.parameters():  # move off the zero initialisation of the output gates
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    step = step.double()
    y, _ = step(x)
    torch.testing.assert_close(y, step.branch.block(x), rtol=1e-12, atol=1e-12)


def test_cbam_made_residual_adds_its_input():
    step = invertibility.build_step("cbam", 8, 0.9).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    assert isinstance(step.branch, ordinary.CBAM)
    torch.testing.assert_close(step(x)[0], x + step.branch(x))


@pytest.mark.parametrize("variant", invertibility.VARIANTS)
def test_every_variant_builds_and_inverts_at_initialisation(variant):
    step = invertibility.build_step(variant, 4, 0.9).eval()
    x = torch.rand(3, 4, 4, 4)
    with torch.no_grad():
        y, _ = step(x)
        x_back, _ = step.inverse(y)
        y_again, _ = step(x_back)
    assert step.last_inverse.converged
    assert (y_again - y).abs().max() < 1e-4  # the solver found a preimage of y
    if variant != "faithful:concat":
        assert (x_back - x).abs().max() < 1e-4  # and it is x
    # the faithful concat branch (ELU of a sum, unbounded) is not a contraction even at
    # initialisation: its fixed point need not be unique, and here it is another one.


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: faithful:gaussian"):
        invertibility.build_step("sagann", 4, 0.9)


def test_invertibility_experiment_end_to_end(tmp_path):
    kinds = ["external", "l2", "gaussian", "faithful:dot", "sagan", "cbam"]
    invertibility.main(
        ["--dataset", "digits", "--kinds", str(kinds), "--steps", "20", "--test-images", "16",
         "--show", "4", "--threads", str(torch.get_num_threads()), "--out", str(tmp_path),
         "--no-progress"]
    )  # fmt: skip
    rows = {r["variant"]: r for r in _rows(tmp_path / "results.csv")}
    assert list(rows) == kinds
    for kind in ("external", "l2", "gaussian"):  # certified: the inverse is exact to float32
        assert rows[kind]["converged"] == "True"
        assert float(rows[kind]["max_abs_levels"]) < 1e-2
        assert float(rows[kind]["exact_uint8"]) == 1.0
        assert rows[kind]["exact_images"] == "16/16"
        assert rows[kind]["certified_bound"].endswith("(l-inf)")
    assert rows["sagan"]["certified_bound"] == "none"
    assert rows["faithful:dot"]["certified_bound"] == "none"
    assert rows["gaussian"]["group"] == "paper (certified)"
    table = (tmp_path / "results.md").read_text()
    assert "1500 training images, 16 held-out images" in table
    assert all(f"| {kind} |" in table for kind in kinds)
    with Image.open(tmp_path / "reconstructions.png") as figure:
        assert figure.size[0] > 100 and figure.size[1] > 100
    grid = tmp_path / "grid_external.png"
    with Image.open(grid) as image:  # input row over reconstruction row
        assert image.size[1] > image.size[0] / 4 * 2 * 0.9


def test_density_experiment_end_to_end(tmp_path):
    density.main(
        ["--dataset", "digits", "--models", "[iresnet, iresnet@series, glow]", "--budget", "0.03",
         "--eval-every", "0.6", "--eval-images", "32", "--test-images", "64", "--sample-n", "4",
         "--threads", str(torch.get_num_threads()), "--device", "cpu", "--out", str(tmp_path)]
    )  # fmt: skip
    rows = {r["model"]: r for r in _rows(tmp_path / "results.csv")}
    assert list(rows) == ["iresnet", "iresnet@series", "glow"]
    for row in rows.values():
        assert 0 < float(row["test_bpd"]) < 20 and float(row["test_se"]) > 0
        assert float(row["train_s"]) >= 0.03 * 60
        assert "exact" in row["estimator"]  # digits: 64 values per image, exact log-dets
    assert "Russian roulette" in rows["iresnet"]["training"]
    assert "power series" in rows["iresnet@series"]["training"]
    # paired differences from the baseline, over the same images and noise
    assert rows["iresnet"]["vs_baseline"] == "nan"
    for name in ("iresnet@series", "glow"):
        row = rows[name]
        diff, se = float(row["vs_baseline"]), float(row["vs_baseline_se"])
        expected = float(row["test_bpd"]) - float(rows["iresnet"]["test_bpd"])
        assert diff == pytest.approx(expected, abs=1e-9) and se > 0
        assert row["significant"] == ("no" if abs(diff) <= 2 * se else row["significant"])
    series = rows["iresnet@series"]
    assert float(series["series_bias_bound"]) > 0 and float(series["series_claim"]) > 0
    curve = [r for r in _rows(tmp_path / "curves.csv") if r["model"] == "glow"]
    # at least the start and the end; how many evaluations fit between depends on the
    # machine's speed (a loaded machine may take one step in the whole budget)
    assert len(curve) >= 2 and curve[0]["step"] == "0" and int(curve[-1]["step"]) >= 1
    times = [float(r["train_s"]) for r in curve]
    assert times == sorted(times)
    table = (tmp_path / "results.md").read_text()
    assert "64 test images" in table and "paired difference from iresnet" in table
    assert "certified bias bound" in table
    for name in ("bpd_vs_time.png", "samples_glow.png", "samples_iresnet@series.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_configs_parse_and_name_valid_models(path):
    script = density if path.parent.name == "density" else invertibility
    config = common.read_config(script.Config, path)
    if script is density:
        for spec in config.models:
            density.model_config(spec, config, (3, 32, 32))
        assert config.model["size"] in ("tiny", "paper")
    else:
        assert set(config.kinds) <= set(invertibility.VARIANTS)
    assert config.dataset in ("svhn", "celeba") or config.dataset.endswith(".npz")
    if config.dataset in ("svhn", "celeba"):
        assert config.image_size in (0, 32)


def test_configs_cover_three_datasets_both_ways():
    names = {f"{p.parent.name}/{p.stem}" for p in CONFIGS}
    for dataset in ("cifar10", "svhn", "celeba"):
        assert f"invertibility/{dataset}" in names
        assert {f"density/{dataset}-cpu", f"density/{dataset}-gpu"} <= names


def test_unknown_config_key_suggests_the_closest(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('dataset = "digits"\nstepz = 3\n')
    with pytest.raises(SystemExit, match="did you mean 'steps'"):
        invertibility.main(["--config", str(path)])


def test_missing_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="SVHN not found"):
        density.main(["--dataset", "svhn", "--root", str(tmp_path), "--models", "[glow]"])


def test_density_resume_keeps_finished_models(tmp_path, capsys):
    common_flags = ["--dataset", "digits", "--budget", "0.01", "--eval-every", "0.6",
                    "--eval-images", "16", "--test-images", "32", "--sample-n", "2",
                    "--threads", str(torch.get_num_threads()), "--device", "cpu",
                    "--out", str(tmp_path)]  # fmt: skip
    density.main(["--models", "[glow]", *common_flags])
    first = _rows(tmp_path / "results.csv")
    density.main(["--models", "[glow, glow-attn]", "--resume", "true", *common_flags])
    assert "resuming: glow already done" in capsys.readouterr().out
    rows = _rows(tmp_path / "results.csv")
    assert [r["model"] for r in rows] == ["glow", "glow-attn"]
    assert rows[0] == first[0]  # kept, not retrained
    with pytest.raises(SystemExit, match="another setting"):
        density.main(["--models", "[glow]", "--resume", "true", "--lr", "0.5", *common_flags])


def test_density_reports_non_finite_models_as_such():
    class Diverged:
        def bits_per_dim(self, x, **options):
            from flowattn.metrics import summarize_bits_per_dim

            return summarize_bits_per_dim(torch.tensor([[float("inf")]]), "series")

    assert density.figure_or_none(Diverged(), torch.zeros(1), seed=0) is None
    assert density._bpd(math.nan, math.nan) == "non-finite"


def test_svhn_and_celeba_configs_run_on_files_in_torchvision_layouts(tmp_path):
    from conftest import write_celeba, write_svhn

    write_svhn(tmp_path / "svhn", "train", n=8)
    write_svhn(tmp_path / "svhn", "test", n=4)
    write_celeba(tmp_path / "celeba")  # 3 train, 1 valid, 2 test JPEGs of 218 x 178
    for name in ("svhn", "celeba"):
        out = tmp_path / f"out-{name}"
        invertibility.main(
            ["--config", str(ROOT / f"experiments/configs/invertibility/{name}.toml"),
             "--root", str(tmp_path / name), "--kinds", "[external]", "--steps", "2",
             "--batch-size", "2", "--test-images", "2", "--show", "2", "--no-progress",
             "--threads", str(torch.get_num_threads()), "--out", str(out)]
        )  # fmt: skip
        row = _rows(out / "results.csv")[0]
        assert row["exact_images"] == "2/2"
        assert "32x32" in (out / "results.md").read_text() or name == "svhn"


def test_density_specs_name_faithful_and_certified_paper_kinds():
    config = density.Config()
    certified = density.model_config("iresnet-attn:dot", config, (3, 32, 32))
    faithful = density.model_config("iresnet-attn:faithful:dot@series", config, (3, 32, 32))
    assert certified.attention == faithful.attention == "dot"
    assert certified.attention_certified and not faithful.attention_certified
    assert faithful.estimator == "series" and certified.estimator == "roulette"


def test_attention_ablation_end_to_end_and_resume(tmp_path, capsys):
    """Both budgets are evaluated per run, the tables' paired differences are those of
    the per-image values, samples are drawn, and a second call trains nothing."""
    import json

    models = "[iresnet, iresnet+actnorm, iresnet+conv, iresnet-attn:external"
    models += ", iresnet-attn:external/random]"
    argv = ["--dataset", "digits", "--train_images", "256", "--test_images", "24",
            "--models", models, "--seeds", "[0, 1]", "--steps", "4", "--seconds", "0.3",
            "--warmup", "2", "--model", "{blocks: 1, hidden: 4}",
            "--threads", str(torch.get_num_threads()), "--out", str(tmp_path)]  # fmt: skip
    attention_ablation.main(argv)
    state = json.loads((tmp_path / "ablation.json").read_text())
    assert len(state["runs"]) == 10
    for run in state["runs"].values():
        assert run["steps"]["step"] == 4 and run["time"]["seconds"] >= 0.3
        assert len(run["steps"]["values"]) == 24 and run["steps"]["estimator"].startswith("exact")
    runs = state["runs"]
    per_seed = [
        sum(a - b for a, b in zip(runs[f"iresnet-attn:external|{s}"]["time"]["values"],
                                  runs[f"iresnet+actnorm|{s}"]["time"]["values"], strict=True)) / 24
        for s in (0, 1)
    ]  # fmt: skip
    table = (tmp_path / "ablation.md").read_text()
    assert "### Equal steps: 4 steps" in table and "### Equal time: 0.3 s" in table
    time_table = table.split("### Equal time")[1].split("### Similarity init")[0]
    (row,) = [
        line for line in time_table.splitlines() if line.startswith("| iresnet-attn:external |")
    ]
    assert f"{sum(per_seed) / 2:+.4f}" in row.split("|")[6]
    twin = [
        sum(a - b for a, b in zip(runs[f"iresnet-attn:external|{s}"]["steps"]["values"],
                                  runs[f"iresnet-attn:external/random|{s}"]["steps"]["values"],
                                  strict=True)) / 24
        for s in (0, 1)
    ]  # fmt: skip
    (row,) = [
        line
        for line in table.split("### Similarity init")[1].split("Share of")[0].splitlines()
        if "external |" in line
    ]
    assert f"{sum(twin) / 2:+.4f}" in row.split("|")[2]
    assert len(runs["iresnet-attn:external|0"]["init_share"]) == 1
    assert "samples" in runs["iresnet|0"] and "samples" not in runs["iresnet|1"]
    with Image.open(tmp_path / "samples.png") as image:
        assert image.size[0] > 3 * image.size[1]  # five labelled panels side by side
    capsys.readouterr()
    attention_ablation.main(argv)
    assert "seed 0:" not in capsys.readouterr().out  # nothing trained again
    with pytest.raises(SystemExit, match="another setting"):
        attention_ablation.main([*argv[:-2], "--steps", "5", "--out", str(tmp_path)])


def test_dense_experiment_end_to_end_and_resume(tmp_path, capsys):
    """Both budgets are scored per run with the COD metrics, the paired S differences in
    the table are those of the per-image values, the first seed's maps are drawn, costs
    are reported, and a second call trains nothing."""
    import json

    argv = ["--train_images", "32", "--test_images", "12", "--width", "4",
            "--variants", "[none, invertible:dot, nonlocal]", "--seeds", "[0, 1]",
            "--steps", "3", "--seconds", "0.2", "--batch_size", "8",
            "--threads", str(torch.get_num_threads()), "--out", str(tmp_path)]  # fmt: skip
    dense.main(argv)
    runs = json.loads((tmp_path / "dense.json").read_text())["runs"]
    assert len(runs) == 6
    for run in runs.values():
        assert run["steps"]["step"] == 3 and run["time"]["seconds"] >= 0.2
        assert len(run["steps"]["per_image_s"]) == 12 and 0 < run["saved_mib"]
        assert set(dense.METRICS) <= set(run["steps"])
    assert len(runs["none|0"]["time"]["maps"]) == dense.SHOWN and "maps" not in runs["none|1"]
    per_seed = [
        sum(a - b for a, b in zip(runs[f"invertible:dot|{s}"]["steps"]["per_image_s"],
                                  runs[f"nonlocal|{s}"]["steps"]["per_image_s"], strict=True)) / 12
        for s in (0, 1)
    ]  # fmt: skip
    table = (tmp_path / "dense.md").read_text()
    steps_table = table.split("### Equal steps")[1].split("### Equal time")[0]
    (row,) = [line for line in steps_table.splitlines() if line.startswith("| invertible:dot")]
    assert f"{sum(per_seed) / 2:+.4f}" in row.split("|")[9]
    assert "saved for backward" in table
    with Image.open(tmp_path / "predictions.png") as image:
        assert image.size[0] > image.size[1] / 2  # 8 columns, 5 rows
    capsys.readouterr()
    dense.main(argv)
    assert "seed 0:" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not among the variants"):
        dense.main([*argv, "--reference", "sagan"])


def test_ablation_specs_place_the_step_at_another_scale():
    config = attention_ablation.Config(model={"attention_scale": 1})
    shape = (3, 32, 32)
    assert attention_ablation.model_config("iresnet-attn:l2", config, shape).attention_scale == 1
    moved = attention_ablation.model_config("iresnet-attn:l2@0", config, shape)
    assert moved.attention_scale == 0 and moved.attention == "l2"
    control = attention_ablation.model_config("iresnet+actnorm@0", config, shape)
    assert control.extra_step == "actnorm" and control.attention_scale == 0
    with pytest.raises(ValueError, match="a number"):
        attention_ablation.model_config("iresnet-attn:l2@x", config, shape)


def test_ablation_specs_start_the_similarity_maps_another_way():
    config = attention_ablation.Config(model={"attention_options": {"heads": 2}})
    shape = (3, 32, 32)
    twin = attention_ablation.model_config("iresnet-attn:l2@0/random", config, shape)
    assert twin.attention_options == {"heads": 2, "similarity_init": "random"}
    assert twin.attention_scale == 0
    assert attention_ablation.model_config("iresnet-attn:l2", config, shape).attention_options == {
        "heads": 2
    }
    with pytest.raises(ValueError, match="one of selection, random"):
        attention_ablation.model_config("iresnet-attn:l2/orthogonal", config, shape)
    with pytest.raises(ValueError, match="only an attention spec"):
        attention_ablation.model_config("iresnet+conv/random", config, shape)


def test_demo_inverts_the_digits_through_every_variant(tmp_path, capsys):
    from flowattn.nn.attention_kinds import VARIANTS

    rows = demo.run(demo.Config(n=4, out=str(tmp_path)))
    assert [row["variant"] for row in rows] == list(VARIANTS)
    for row in rows:  # the certified steps invert to the pixel (the faithful need not)
        if not row["variant"].startswith("faithful:"):
            assert row["converged"] and row["max_error"] == 0 and row["exact"] == 1.0
            assert 0 <= row["local"] <= row["bound"] < 1
        else:
            assert row["bound"] is None and 0 <= row["exact"] <= 1
    with Image.open(tmp_path / "reconstructions.png") as grid:
        assert grid.size[0] > 0 and grid.size[1] > grid.size[0] / 4 * (len(VARIANTS) + 1) / 2
    assert "wrote" in capsys.readouterr().out


def test_demo_rejects_bad_settings():
    with pytest.raises(SystemExit, match="n and max_iter must be at least 1"):
        demo.main(["--n", "0"])
