"""W&B, offline: the real entrypoints write runs that `wandb leet inspect` reads back."""
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_entry, tiny_run_args


def leet(run_dir: Path, *args: str) -> str:
    """stdout of `wandb leet inspect ARGS --json` on the run's latest W&B run."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli), "leet", "inspect", *args, "--json", str(run_dir / "wandb" / "latest-run")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def leet_summary(run_dir: Path) -> dict:
    return json.loads(leet(run_dir, "--summary"))


def leet_records(run_dir: Path) -> list:
    """Every record of the run's .wandb log."""
    return [json.loads(line) for line in leet(run_dir).splitlines() if line.strip()]


def leet_run_record(run_dir: Path) -> dict:
    return next(r for r in leet_records(run_dir) if r.get("type") == "run")


def offline_args(tmp_path, *extra):
    args = tiny_run_args(tmp_path, *extra)
    return [a for a in args if not a.startswith("wandb.mode=")] + [
        "wandb.mode=offline", "wandb.group=sweep-b100", "wandb.tags=[smoke,cpu]", "wandb.project=simclr-tests"]


def test_pretraining_run_reads_back_and_resume_keeps_the_run_id(tmp_path):
    first = run_entry("pretrain.py", *offline_args(tmp_path, "train.epochs=1"))
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "tiny"
    summary = leet_summary(run_dir)
    assert summary["state"] == "finished" and summary["tags"] == ["smoke", "cpu"]
    assert summary["project"] == "simclr-tests"
    assert summary["config"]["model"]["width"] == 4 and summary["config"]["world_size"] == 1
    assert {"git_sha", "device_name", "torch_version"} <= set(summary["config"])
    local = json.loads((run_dir / "summary.json").read_text())
    assert summary["summary"]["knn/best_top1"] == local["knn/best_top1"]
    assert summary["summary"]["knn/top1"]["last"] == local["knn/top1"]  # knn/top1 keeps last and max
    assert summary["summary"]["knn/top1"]["max"] == local["knn/best_top1"]
    record = leet_run_record(run_dir)["run"]
    assert record["run_group"] == "sweep-b100" and record["job_type"] == "pretrain"
    run_id = summary["run_id"]
    import torch
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["wandb_run_id"] == run_id

    files = run_dir / "wandb" / "latest-run" / "files"
    grid = summary["summary"]["media/view_pairs"]  # 16 pairs, 4 per row, 32 px images with 2 px borders
    assert grid["_type"] == "image-file" and (grid["height"], grid["width"]) == (4 * 34 + 2, 8 * 34 + 2)
    from PIL import Image
    pixels = Image.open(files / grid["path"])
    assert pixels.mode == "RGB" and pixels.size == (8 * 34 + 2, 4 * 34 + 2)
    assert len(set(pixels.getdata())) > 100  # real views, not a blank frame
    embeddings = summary["summary"]["val/embeddings"]  # the 200 validation images, ResNet-18 width 4: 32-d
    table = json.loads((files / embeddings["path"]).read_text())
    assert table["columns"] == ["label", "class", "embedding"] and len(table["data"]) == 200
    assert all(len(row[2]) == 32 and 0 <= row[0] < 10 for row in table["data"])

    artifacts = [r["artifact"] for r in leet_records(run_dir) if r.get("type") == "artifact"]
    artifacts = [a for a in artifacts if a["type"] != "run_table"]  # tables travel as artifacts of their own
    assert len(artifacts) == 1 and artifacts[0]["type"] == "model"
    assert set(artifacts[0]["aliases"]) == {"latest", "best"}  # the log does not keep their order

    second = run_entry("pretrain.py", *offline_args(tmp_path, "train.epochs=2"))  # resumes from the checkpoint
    assert second.returncode == 0, second.stderr
    assert "resume: from epoch 1" in second.stdout
    assert leet_summary(run_dir)["run_id"] == run_id


def test_evaluation_job_type(tmp_path):
    pretrain = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0"))
    assert pretrain.returncode == 0, pretrain.stderr
    result = run_entry("finetune.py", "data.name=synthetic", "device=cpu", "data.val_size=500", "eval.mode=knn",
                       "eval.knn_k=20", f"checkpoint={tmp_path / 'tiny'}", f"run.dir={tmp_path}", "run.name=knn",
                       "wandb.mode=offline", "wandb.group=evals")
    assert result.returncode == 0, result.stderr
    summary = leet_summary(tmp_path / "knn")
    results = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert summary["summary"]["test/top1"] == results["test/top1"]
    record = leet_run_record(tmp_path / "knn")["run"]
    assert record["job_type"] == "knn" and record["run_group"] == "evals"
    assert summary["config"]["input/encoder"] == str((tmp_path / "tiny" / "encoder.pt").resolve())
    files = tmp_path / "knn" / "wandb" / "latest-run" / "files"
    per_class = json.loads((files / summary["summary"]["test/per_class_accuracy"]["path"]).read_text())
    assert per_class["columns"] == ["class", "test top-1 %", "test images"]
    assert {row[0]: row[1] for row in per_class["data"]} == results["test/per_class"]
    assert [row[2] for row in per_class["data"]] == [sum(row) for row in results["test/confusion"]]
    chart = next(v for k, v in summary["summary"].items() if k.startswith("test/confusion_matrix"))
    counts = json.loads((files / chart["path"]).read_text())  # W&B's chart table: (actual, predicted, count)
    assert sum(row[-1] for row in counts["data"]) == sum(map(sum, results["test/confusion"]))


def test_disabled_never_loads_wandb(tmp_path):
    """A LARS pretraining run and a kNN evaluation with wandb.mode=disabled, then a ViT built (timm imported), in a
    fresh interpreter: wandb never enters sys.modules (timm would import it on its own otherwise), so nothing can
    touch the network."""
    code = f"""
import sys
import finetune, pretrain
assert "wandb" not in sys.modules
pretrain.main({tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0", "optim.name=lars")!r})
finetune.main(["data.name=synthetic", "device=cpu", "data.val_size=500", "eval.mode=knn", "eval.knn_k=20",
               "checkpoint={tmp_path / 'tiny'}", "run.dir={tmp_path}", "run.name=knn", "wandb.mode=disabled"])
assert "timm" not in sys.modules and "torchvision" not in sys.modules  # neither is needed for a ResNet run
from models import create_encoder
create_encoder("vit_tiny")
assert "timm" in sys.modules
loaded = sys.modules.get("wandb")
print("wandb loaded:", loaded is not None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "wandb loaded: False"
    assert not (tmp_path / "tiny" / "wandb").exists()


def test_view_pair_grid_shows_the_pixels_the_encoder_saw():
    """Undoing the normalization gives back the uint8 pixels exactly; pairs sit side by side, borders white."""
    import torch

    from augment import CIFAR10_MEAN, CIFAR10_STD
    from augment.ops import normalize
    from rundir.plots import view_pair_grid

    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a, b = (normalize(x.float() / 255, CIFAR10_MEAN, CIFAR10_STD) for x in (images, images.flip(-1)))
    grid = view_pair_grid(a, b, CIFAR10_MEAN, CIFAR10_STD, pairs=4, pairs_per_row=2)
    assert grid.dtype == torch.uint8 and grid.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
    tile = lambda row, col: grid[2 + 34 * row:34 * (row + 1), 2 + 34 * col:34 * (col + 1)].permute(2, 0, 1)  # noqa
    assert torch.equal(tile(0, 0), images[0]) and torch.equal(tile(0, 1), images[0].flip(-1))
    assert torch.equal(tile(1, 2), images[3]) and torch.equal(tile(1, 3), images[3].flip(-1))
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()
