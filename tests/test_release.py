"""Co-Settle release files (the authors' checkpoint-4.pth format): import into a cosettle run,
export back, evaluate directly, refuse what does not fit, and report against the paper.

Releases are built here from a known model state: the encoder of a tiny backbone in its original
repository's naming (``tests/fake_releases.py``), adapter tensors under the release's own names
(written out by hand below, not by the code under test) and an ``argparse.Namespace`` of the
authors' flags. Projected features are checked against tokens of fake_releases' independent timm
reference passed through the projection computed by hand from the adapter tensors."""
import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from fake_releases import (
    TINY,
    TOL,
    WRITERS,
    images,
    official_encoder,
    optimizer_state,
    timm_reference,
    write_dino,
    write_mae,
)
from safetensors.torch import load_file, save_file

from cosettle.app import report as report_mod
from cosettle.app.cli import main as cosettle
from cosettle.app.published import read_published
from cosettle.app.results import BASE_SCHEMA, write_row
from cosettle.core.provenance import sha256_file
from cosettle.eval import cli as eval_cli
from cosettle.eval.frame.synthetic import write_davis
from cosettle.pipeline.backbones import load_backbone
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.projection import build_projection
from cosettle.trainer.release_format import ReleaseError, adapter_key_map, read_release
from cosettle.trainer.trained import load_trained

D = TINY["embed_dim"]
ARCH = json.dumps(TINY)
# The authors' main_pretrain.py flags of a '+Ours' run (their run script's values), plus what
# misc.init_distributed_mode adds.
ARGS = dict(batch_size=128, epochs=5, accum_iter=1, model="mae_vit_large_patch16", input_size=224, patch_size=16,
            optimizer="AdamW", weight_decay=0.05, lr=0.0002, blr=1e-4, min_lr=0.0, warmup_epochs=1,
            data_path="./data/k400_valid_files.txt", dataset="Kinetics-400", output_dir="./experiments/x",
            log_dir="./experiments/x", device="cuda", seed=0, resume="./ckpts/ori/x.pth", start_epoch=0, save_fre=4,
            num_workers=4, pin_mem=True, world_size=4, local_rank=-1, dist_on_itp=False, dist_url="env://",
            use_adapter=True, clip_gap=0.15, win_size=2, use_asy_pos_embedding=True, asy_pos_ratio=10.0,
            fusion_net="linear", temp=0.03, lambda_reg=3.0, reg_loss="kl", base_model="dino", model_type="vitb16",
            PEA_crop_mode="random", config_file="", opts=[], rank=0, gpu=0, distributed=True, dist_backend="nccl")
# The release's adapter names per variant, written out from COSETTLE_METHOD.md section 1 (Linear
# layers in order, then the LayerNorm) and the key names.
RELEASE_LAYERS = {"linear": ["adapter_linear", "adapter_layer_norm1"],
                  "mlp2": ["adapter_linear1", "adapter_linear2", "adapter_layer_norm1"],
                  "mlp3": ["adapter_linear1", "adapter_linear2", "adapter_linear3", "adapter_layer_norm1"]}


def adapter(fusion: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in RELEASE_LAYERS[fusion]:
        shape = (D,) if "norm" in name else (D, D)
        out[f"adapter.adapter.{name}.weight"] = (1.0 if "norm" in name else 0.0) + torch.randn(shape, generator=g) * 0.2
        out[f"adapter.adapter.{name}.bias"] = torch.randn(D, generator=g) * 0.1
    return out


def by_hand(ad: dict, fusion: str, x: torch.Tensor) -> torch.Tensor:
    """The release's fusion net computed directly from its tensors (section 1)."""
    w = {k.removeprefix("adapter.adapter."): v for k, v in ad.items()}
    linears = [n for n in RELEASE_LAYERS[fusion] if "linear" in n]
    for i, name in enumerate(linears):
        x = x @ w[f"{name}.weight"].T + w[f"{name}.bias"]
        if i < len(linears) - 1 or fusion == "linear":
            x = torch.tanh(x)
    return F.layer_norm(x, (D,), w["adapter_layer_norm1.weight"], w["adapter_layer_norm1.bias"])


def write_release(path: Path, encoder: dict, ad: dict, args=None, **extra) -> Path:
    obj = {"model": {**encoder, **ad}, "optimizer": optimizer_state(), "epoch": 4,
           "scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                      "_growth_tracker": 7},
           "args": argparse.Namespace(**(ARGS if args is None else args))} | extra
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """A tiny DINO base file, and its '+Ours' release (linear) built from the same encoder."""
    tmp = tmp_path_factory.mktemp("dino")
    base = write_dino(tmp)
    ad = adapter("linear")
    release = write_release(tmp / "checkpoint-4.pth", official_encoder(base.ref), ad)
    return base, release, ad


def invoke(command, args: list) -> object:
    return CliRunner().invoke(command, [str(a) for a in args])


def imported(release: Path, backbone: str, out: Path, *extra) -> dict:
    result = invoke(cosettle, ["import-release", release, "--backbone", backbone, "--out", out, "--arch", ARCH, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "config.json").read_text())


# ---------------------------------------------------------------- key map, import, features


def test_adapter_key_map_follows_the_projection_sequential():
    assert adapter_key_map("linear") == {
        "adapter.adapter.adapter_linear.weight": "0.weight", "adapter.adapter.adapter_linear.bias": "0.bias",
        "adapter.adapter.adapter_layer_norm1.weight": "2.weight", "adapter.adapter.adapter_layer_norm1.bias": "2.bias"}
    for fusion, indices in (("mlp2", [0, 2, 3]), ("mlp3", [0, 2, 4, 5])):
        expected = {f"adapter.adapter.{n}.{p}": f"{i}.{p}" for n, i in zip(RELEASE_LAYERS[fusion], indices)
                    for p in ("weight", "bias")}
        assert adapter_key_map(fusion) == expected
        assert set(build_projection(D, fusion).state_dict()) == set(expected.values())


@pytest.mark.parametrize("writer,backbone,fusion", [(write_dino, "dino_vitb", "mlp3"), (write_mae, "mae_vitb", "mlp2")])
def test_import_gives_the_independently_computed_features(writer, backbone, fusion, tmp_path):
    base = writer(tmp_path)
    raw = torch.load(base.path, weights_only=True)
    encoder = raw["model"] if backbone == "mae_vitb" else raw  # MAE's model dict, decoder included
    ad = adapter(fusion, seed=3)
    args = ARGS | {"fusion_net": fusion, "base_model": backbone.split("_")[0], "blr": 2e-4, "my_flag": [1, 2]}
    release = write_release(tmp_path / "checkpoint-4.pth", encoder, ad, args)
    config = imported(release, backbone, tmp_path / "run", "--weights", base.path)

    module, loaded = load_trained(tmp_path / "run")
    backbone_model = load_backbone(backbone, base.path, arch=TINY)
    x = images()
    with torch.no_grad():
        ours = module(backbone_model.patch_features(x))
        reference = by_hand(ad, fusion, base.reference(x))
    torch.testing.assert_close(ours, reference, **TOL)

    assert config["backbone"] == backbone and config["dim"] == D
    assert config["weights_sha256"] == sha256_file(base.path) and config["weights"] == base.path.name
    assert config["release"]["sha256"] == sha256_file(release) and config["release"]["file"] == str(release.resolve())
    assert config["release"]["epoch"] == 4 and config["release"]["base_match"]["identical"] == config["release"]["encoder_tensors"]
    train = config["train"]
    assert (train["objective"], train["fusion"], train["temp"], train["lambda_reg"], train["reg_loss"]) == \
        ("cosettle", fusion, 0.03, 3.0, "kl")
    assert (train["epochs"], train["blr"], train["warmup_epochs"], train["batch_size"]) == (5, 2e-4, 1.0, 512)
    assert config["lr"] == 0.0002 and config["extract"] == {"clip_gap": 0.15, "asy_ratio": 10.0}
    kept = config["release_args"]
    assert kept["my_flag"] == [1, 2] and kept["data_path"] == ARGS["data_path"] and kept["world_size"] == 4
    assert not {"temp", "lambda_reg", "fusion_net", "batch_size", "blr", "lr"} & set(kept)
    assert (tmp_path / "run" / "summary.json").is_file() and loaded == config


# backbone -> (its fake official file's container, the wrapper prefix its own module names sit under)
WRAPPED = {"mocov3_vitb": ("state_dict", "module.momentum_encoder."), "ijepa_vitb": ("encoder", "module."),
           "blip_vitb": ("model", "visual_encoder."), "dinov2_vitb": ("teacher", "backbone."), "ibot_vitb": ("state_dict", "")}


@pytest.mark.parametrize("backbone", list(WRAPPED))
def test_release_names_are_the_backbones_own(backbone, tmp_path):
    """The encoder in a release under the backbone's own names (prefix stripped here by hand): it
    loads through the backbone's format and gives the reference's tokens through the projection."""
    base = WRITERS[backbone](tmp_path)
    container, prefix = WRAPPED[backbone]
    raw = torch.load(base.path, weights_only=True)[container]
    encoder = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    ad = adapter("linear", seed=5)
    args = ARGS | {"base_model": backbone.split("_")[0]}
    release = write_release(tmp_path / "checkpoint-4.pth", encoder, ad, args)
    config = imported(release, backbone, tmp_path / "run", "--weights", base.path)
    assert config["release"]["base_match"]["identical"] == config["release"]["encoder_tensors"]
    module, _ = load_trained(tmp_path / "run")
    x = images()
    with torch.no_grad():
        ours = module(load_backbone(backbone, base.path, arch=base.arch).patch_features(x))
    torch.testing.assert_close(ours, by_hand(ad, "linear", base.reference(x)), **TOL)


def test_eval_accepts_the_release_file_as_projection(dino, tmp_path):
    base, release, _ = dino
    davis = tmp_path / "DAVIS"
    write_davis(davis, ["bear", "car"], frames=4, height=64, width=96, objects=2)
    common = ["davis", "--root", davis, "--backbone", "dino_vitb", "--weights", base.path, "--arch", ARCH,
              "--short-side", "64", "--multiple", "32", "--device", "cpu", "--cache", tmp_path / "cache.zarr"]
    result = invoke(eval_cli.main, common + ["--projection", release, "--out", tmp_path / "direct"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "direct" / "run.json").read_text())
    info = record["projection"]
    assert info["run_weights_sha256"] == sha256_file(release) and info["run_dir"] == str(release.resolve())
    assert info["release"]["encoder_identical"] == info["release"]["encoder_tensors"] and info["fusion"] == "linear"

    # the same numbers through an imported run, tied by the encoder digest (no --weights at import)
    config = imported(release, "dino_vitb", tmp_path / "run")
    assert config["weights_sha256"] is None and len(config["encoder_sha256"]) == 64
    result = invoke(eval_cli.main, common + ["--projection", tmp_path / "run", "--out", tmp_path / "via-run"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "via-run" / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "direct" / "summary.json").read_text())

    # another DINO checkpoint as --weights: refused, directly and through the run
    other = tmp_path / "other_dino.pth"
    torch.save(official_encoder(timm_reference("vit_base_patch16_224", seed=11)), other)
    bad = [a if a != base.path else other for a in common]
    result = invoke(eval_cli.main, bad + ["--projection", release, "--out", tmp_path / "bad"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "embedded encoder differs from other_dino.pth" in result.output
    result = invoke(eval_cli.main, bad + ["--projection", tmp_path / "run", "--out", tmp_path / "bad2"])
    assert result.exit_code == 1 and "nor the encoder of the imported release" in result.output


# ---------------------------------------------------------------- round trips


def write_run(path: Path, base: Path, fusion: str) -> Path:
    """A finished cosettle-train run of dino_vitb (seed-1 projection) made on ``base``."""
    path.mkdir(parents=True)
    cfg = TrainConfig(features=("store.zarr",), out=str(path), epochs=3, batch_size=64, blr=2e-4,
                      options={"fusion": fusion, "lambda_reg": 1.5})
    config = {"train": cfg.as_dict(), "dim": D, "backbone": "dino_vitb", "weights_sha256": sha256_file(base),
              "world_size": 2, "lr": 1e-4}
    (path / "config.json").write_text(json.dumps(config))
    save_file(build_projection(D, fusion, seed=1).state_dict(), str(path / "projection.safetensors"))
    (path / "summary.json").write_text("{}")
    return path


@pytest.mark.parametrize("fusion", ["linear", "mlp2"])
def test_run_exported_and_imported_is_bit_identical(dino, fusion, tmp_path):
    base = dino[0]
    run = write_run(tmp_path / "run", base.path, fusion)
    out = tmp_path / "exported" / "checkpoint-2.pth"
    result = invoke(cosettle, ["export-release", run, "--weights", base.path, "--out", out, "--arch", ARCH])
    assert result.exit_code == 0, result.output
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(out, weights_only=True)
    assert set(obj) == {"model", "optimizer", "epoch", "scaler", "args"} and obj["epoch"] == 2
    assert isinstance(obj["args"], argparse.Namespace)
    a = vars(obj["args"])
    assert (a["fusion_net"], a["lambda_reg"], a["temp"], a["epochs"], a["blr"], a["base_model"]) == \
        (fusion, 1.5, 0.03, 3, 2e-4, "dino")
    assert a["batch_size"] * a["world_size"] == 128 and a["lr"] == 1e-4
    assert set(obj["model"]) == set(official_encoder(base.ref)) | set(adapter_key_map(fusion))

    config = imported(out, "dino_vitb", tmp_path / "back", "--weights", base.path)
    before = load_file(str(run / "projection.safetensors"))
    after = load_file(str(tmp_path / "back" / "projection.safetensors"))
    assert set(before) == set(after)
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    assert config["train"]["batch_size"] == 128 and config["train"]["lambda_reg"] == 1.5

    backbone = load_backbone("dino_vitb", base.path, arch=TINY)
    tokens = backbone.patch_features(images())
    with torch.no_grad():
        f1, f2 = load_trained(run)[0](tokens), load_trained(tmp_path / "back")[0](tokens)
    assert torch.equal(f1, f2)


def test_release_imported_and_exported_keeps_every_tensor_and_arg(dino, tmp_path):
    base, release, _ = dino
    imported(release, "dino_vitb", tmp_path / "run", "--weights", base.path)
    out = tmp_path / "again.pth"
    result = invoke(cosettle, ["export-release", tmp_path / "run", "--weights", base.path, "--out", out, "--arch", ARCH])
    assert result.exit_code == 0, result.output
    with torch.serialization.safe_globals([argparse.Namespace]):
        first, second = torch.load(release, weights_only=True), torch.load(out, weights_only=True)
    assert set(first["model"]) == set(second["model"])
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert vars(second["args"]) == vars(first["args"])  # every flag, mapped or kept, comes back
    assert second["epoch"] == 4 and second["scaler"] == first["scaler"]
    assert second["optimizer"]["param_groups"] == first["optimizer"]["param_groups"]


# ---------------------------------------------------------------- refusals


def refused(release: Path, backbone: str, tmp_path: Path, *extra) -> str:
    result = invoke(cosettle, ["import-release", release, "--backbone", backbone, "--out", tmp_path / "refused",
                               "--arch", ARCH, *extra])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert not (tmp_path / "refused").exists()
    return lines[0]


def test_wrong_backbone_is_refused_naming_the_keys(dino, tmp_path):
    base, release, ad = dino
    unnamed = write_release(tmp_path / "unnamed.pth", official_encoder(base.ref), ad,
                            {k: v for k, v in ARGS.items() if k != "base_model"})
    message = refused(unnamed, "ijepa_vitb", tmp_path)
    assert "does not fit backbone 'ijepa_vitb'" in message and "unexpected 1 keys: cls_token" in message
    # same key names as DINO, but the args say which backbone trained it
    assert "trained on base_model 'dino'" in refused(release, "mae_vitb", tmp_path)
    other = tmp_path / "other.pth"
    torch.save(official_encoder(timm_reference("vit_base_patch16_224", seed=12)), other)
    assert "embedded encoder differs from" in refused(release, "dino_vitb", tmp_path, "--weights", other)
    assert "TorchScript" in refused(release, "clip_vitb", tmp_path)


def test_missing_or_foreign_adapter_is_refused(dino, tmp_path):
    base, _, ad = dino
    encoder = official_encoder(base.ref)
    partial = {k: v for k, v in ad.items() if k != "adapter.adapter.adapter_layer_norm1.bias"}
    message = refused(write_release(tmp_path / "partial.pth", encoder, partial), "dino_vitb", tmp_path)
    assert "missing adapter.adapter.adapter_layer_norm1.bias" in message
    message = refused(write_release(tmp_path / "none.pth", encoder, {}), "dino_vitb", tmp_path)
    assert "no 'adapter.adapter.*' keys" in message
    message = refused(write_release(tmp_path / "mlp2.pth", encoder, ad, ARGS | {"fusion_net": "mlp2"}), "dino_vitb", tmp_path)
    assert "does not match fusion 'mlp2'" in message and "unexpected adapter.adapter.adapter_linear.bias" in message
    # without args the variant is read off the keys, and the settings are the defaults
    config = imported(write_release(tmp_path / "noargs.pth", encoder, adapter("mlp3"), args={}), "dino_vitb",
                      tmp_path / "noargs")
    assert config["train"]["fusion"] == "mlp3" and config["release_args"] == {} and config["train"]["epochs"] == 5
    torch.save({"state_dict": encoder}, tmp_path / "base_only.pth")
    assert "expected a dict with a 'model' entry" in refused(tmp_path / "base_only.pth", "dino_vitb", tmp_path)


MARKER = Path("/tmp/cosettle-test-release-executed")  # written only if unpickling ran our code


def _touch(path: str) -> None:
    Path(path).write_text("executed")


class Payload:
    def __reduce__(self):
        return _touch, (str(MARKER),)


def test_a_pickle_that_needs_code_is_refused_and_nothing_runs(dino, tmp_path):
    MARKER.unlink(missing_ok=True)
    base, _, ad = dino
    path = write_release(tmp_path / "evil.pth", official_encoder(base.ref), ad, extra=Payload())
    message = refused(path, "dino_vitb", tmp_path)
    assert "refused: unpickling it needs" in message and "_touch" in message and "nothing in the file was executed" in message
    assert not MARKER.exists()
    with pytest.raises(ReleaseError, match="not allowed"):
        read_release(path)
    assert not MARKER.exists()


# ---------------------------------------------------------------- the published figures in the report


def test_published_figures_are_the_papers(tmp_path):
    paper = read_published()
    assert len(paper) == 16
    assert paper[("mae_vitb", "base")] == pytest.approx({("davis", "J&F-Mean"): 0.524, ("vip", "mIoU"): 0.293,
                                                         ("jhmdb", "PCK@0.1"): 0.416})
    assert paper[("dinov2_vitb", "+Ours")][("jhmdb", "PCK@0.1")] == pytest.approx(0.473)


def test_report_of_releases_shows_measured_published_and_difference(tmp_path):
    results = tmp_path / "results.parquet"
    measured = {None: {"davis": 0.521, "vip": 0.290}, "release": {"davis": 0.600, "vip": 0.335}}
    for setting, values in measured.items():
        for ev, value in values.items():
            r = dict.fromkeys(f.name for f in BASE_SCHEMA)
            r.update(task=f"eval-mae_vitb-{setting or 'baseline'}-{ev}", provenance=f"{setting}{ev}" * 8,
                     backbone="mae_vitb", backbone_name="mae_vitb", weights_sha256="x",
                     variant="projection" if setting else "baseline", setting=setting,
                     setting_label="+Ours (checkpoint-4.pth)" if setting else None, evaluation=ev, eval_kind=ev,
                     finished="2026-01-01T00:00:00+00:00")
            write_row(results, r, {"source": "release"} if setting else {}, {"J&F-Mean" if ev == "davis" else "mIoU": value})
    result = CliRunner().invoke(report_mod.report, [str(results), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in (tmp_path / "report" / "table.md").read_text().splitlines()]
    assert rows[0] == ["backbone", "setting", "DAVIS J&F_m", "DAVIS J&F_m published", "DAVIS J&F_m measured - published",
                       "VIP mIoU", "VIP mIoU published", "VIP mIoU measured - published"]
    assert rows[2] == ["mae_vitb", "+Ours (checkpoint-4.pth)", "52.1 / 60.0 (+7.9)", "52.4 / 59.6", "-0.3 / +0.4",
                       "29.0 / 33.5 (+4.5)", "29.3 / 33.8", "-0.3 / -0.3"]
    with open(tmp_path / "report" / "table.csv") as f:
        line = next(csv.DictReader(f))
    assert float(line["DAVIS J&F_m published projection"]) == pytest.approx(59.6)
    assert float(line["VIP mIoU projection - published"]) == pytest.approx(-0.3)
    # --no-published: the plain table
    result = CliRunner().invoke(report_mod.report, [str(results), "--out", str(tmp_path / "plain"), "--no-published"])
    assert "published" not in (tmp_path / "plain" / "table.md").read_text()
