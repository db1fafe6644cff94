"""`sslkit evaluate` end to end on a tiny run: the metrics.json blocks (docs/evaluation.md) for the encoder and
both baselines, numbers that agree with a recomputation from the saved arrays, every figure drawn,
then `sslkit report` rendered in headless Chromium."""

import json
from pathlib import Path

import numpy as np
import pytest
from chromium import needs_chromium, render_and_check
from PIL import Image
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

from sslkit.cli import main
from sslkit.config import ConfigError, load_config, recipe_path
from sslkit.engine import train
from sslkit.evaluate.run import evaluate_run
from sslkit.rundir import eval_shards
from sslkit.sharding.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.backbone_kwargs.width=4", "model.projector=[16,8]", "model.predictor=[8,8]",
    "method.queue_size=64", "data.batch_size=16", "data.shuffle_buffer=64", "data.workers=0",
    "tracker.name=none", "train.log_every=1", "train.eval_every=2", "eval.online_samples=48",
]
CLUSTER_KEYS = {"ami", "ari", "nmi", "purity", "acc", "f1", "k"}
PROBE_KEYS = {"accuracy", "precision", "sensitivity", "specificity", "f1", "auc", "protocol", "train_samples"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    make_synthetic(root / "train", num_samples=160, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    make_synthetic(root / "eval", num_samples=96, size=32, seed=1, shard_size=48, prefix="eval", progress=False)
    run = train(load_config(recipe_path("demo"), [*TINY, f"data.shards={root / 'train'}", f"run.dir={root / 'run'}",
                                                  f"eval.shards={root / 'eval'}", "train.max_steps=4"]))
    results = evaluate_run(run, overrides=["eval.projection=tsne", "eval.restarts=1", "eval.knn_k=5",
                                           "eval.gallery=4"])
    return root, run, results


@pytest.mark.slow
def test_metrics_blocks_and_recomputation(evaluated):
    root, run, results = evaluated
    saved = json.loads((run / "eval" / "metrics.json").read_text())
    assert saved["step"] == 4 and saved["num_samples"] == 96 and saved["shards"] == str(root / "eval")
    for block in (saved, saved["baselines"]["raw_pixels"], saved["baselines"]["random_init"]):
        assert set(block["cluster"]) == CLUSTER_KEYS and block["cluster"]["k"] == 4
        assert set(block["knn"]) == {"top1", "k", "search"} and block["knn"]["k"] == 5
        assert block["knn"]["search"] == "exact"  # 96 crops: far below eval.knn_exact_max
        assert set(block["probe"]) == PROBE_KEYS
        # The probe was fitted on the 160 training crops, not on the crops it is scored on.
        assert block["probe"]["protocol"] == "train split" and block["probe"]["train_samples"] == 160
    # The cluster block agrees with scikit-learn on the saved assignments.
    labels, clusters = np.load(run / "eval" / "labels.npy"), np.load(run / "eval" / "clusters.npy")
    assert len(labels) == len(clusters) == len(np.load(run / "eval" / "embeddings.npy")) == 96
    assert saved["cluster"]["ami"] == pytest.approx(adjusted_mutual_info_score(labels, clusters), abs=1e-9)
    assert saved["cluster"]["ari"] == pytest.approx(adjusted_rand_score(labels, clusters), abs=1e-9)
    # The probe block agrees with its own confusion matrix.
    probe = json.loads((run / "eval" / "probe.json").read_text())
    cm = np.array(probe["confusion_matrix"])
    assert cm.sum() == 96 and saved["probe"]["accuracy"] == pytest.approx(np.trace(cm) / 96)
    # Per-stage wall times and peak memory, for a scale benchmark to read; the baselines saw every crop.
    timings = saved["timings"]
    stages = ("embed_s", "kmeans_s", "knn_s", "probe_s", "plots_s")
    assert all(timings[key] > 0 for key in (*stages, "total_s", "peak_rss_gb"))
    assert set(timings["baselines"]) == {"raw_pixels", "random_init"} and saved["baseline_samples"] == 96
    assert timings["baselines_s"] == pytest.approx(sum(sum(b.values()) for b in timings["baselines"].values()))
    assert timings["total_s"] > sum(timings[key] for key in stages) + timings["baselines_s"]
    assert not (run / "eval" / ".embedding").exists()  # the scratch embeddings are gone


@pytest.mark.slow
def test_every_figure_is_drawn(evaluated):
    _, run, results = evaluated
    names = [fig["name"] for fig in results["figures"]]
    assert names == ["curves", "embedding_map", "cluster_confusion", "probe_confusion", "gallery"]
    for fig in results["figures"]:
        with Image.open(run / "eval" / fig["file"]) as image:
            assert image.format == "PNG" and min(image.size) > 100, fig
        assert fig["title"] and fig["caption"]


@pytest.mark.slow
def test_report_of_an_evaluated_run_renders(evaluated):
    needs_chromium()
    _, run, results = evaluated
    main(["report", str(run)])
    page = (run / "report.html").read_text()
    assert "Online evaluation at step 4" in page and "linear probe" in page
    assert "<b>Unseen in training.</b> The evaluation crops: no shard in common with the training set." in page
    render_and_check(run / "report.html", expect_images=len(results["figures"]),
                     screenshot=ROOT / "test-artifacts" / "report-tiny-run.png")


@pytest.mark.slow
def test_cli_takes_overrides_after_the_options(evaluated, tmp_path, capsys):
    import shutil

    root, run, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "eval")
    main(["evaluate", str(copy), "--shards", str(root / "eval"), "eval.plots=false", "eval.knn_k=3",
          "eval.restarts=1", "eval.morphology=true"])
    printed = capsys.readouterr().out
    assert "Written to" in printed and "evaluation crops: unseen in training (no shard in common" in printed
    assert "\nmorphology features " in printed  # the third baseline's row
    saved = json.loads((copy / "eval" / "metrics.json").read_text())
    assert saved["knn"]["k"] == 3 and saved["figures"] == [] and not list((copy / "eval").glob("*.png"))
    assert saved["seen_in_training"]["seen"] == "no" and saved["seen_in_training"]["eval_shards"] == 2
    morphology = saved["baselines"]["morphology"]
    assert set(morphology) == {"cluster", "knn", "probe"} and 0.0 <= morphology["cluster"]["ami"] <= 1.0
    assert morphology["probe"]["protocol"] == saved["probe"]["protocol"]  # fitted on the same training crops
    # Scored on the crops it trained on: said in the table and in metrics.json.
    main(["evaluate", str(copy), "eval.plots=false", "--shards", str(root / "train"), "eval.restarts=1",
          "eval.probe=false", "eval.whiten=8"])  # PCA-whitened to 8 dimensions before k-means
    assert "evaluation crops: SEEN in training (every evaluated shard is a training shard" in capsys.readouterr().out
    assert json.loads((copy / "eval" / "metrics.json").read_text())["seen_in_training"]["seen"] == "all"


@pytest.mark.slow
def test_large_set_settings_approximate_knn_and_baseline_sample(evaluated, tmp_path, capsys):
    """eval.knn_exact_max and eval.baseline_samples set below the 96 crops: what a million-crop set does."""
    import shutil

    root, run, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval"))
    main(["evaluate", str(copy), "eval.plots=false", "eval.restarts=1", "eval.knn_k=5", "eval.knn_exact_max=60",
          "eval.baseline_samples=40"])
    printed = capsys.readouterr().out
    saved = json.loads((copy / "eval" / "metrics.json").read_text())
    knn = saved["knn"]
    assert knn["search"] == "lists" and knn["recall_queries"] == 48 and knn["probe"] == knn["nlist"] == 2
    # 96 rows make 2 lists (at least 39 rows each), and the first breadth searches both: every pair is
    # compared, so recall and top-1 are exact search's.
    assert knn["searched_share"] == pytest.approx(1.0)
    assert knn["recall_at_k"] == pytest.approx(1.0)
    assert knn["top1"] == pytest.approx(json.loads((run / "eval" / "metrics.json").read_text())["knn"]["top1"])
    assert f"recall@5 {knn['recall_at_k']:.3f} against exact search on 48 sampled crops" in printed
    assert saved["baseline_samples"] == 40 and saved["num_samples"] == 96
    assert "baselines: scored on a seeded sample of 40 of the 96 crops" in printed
    assert len(np.load(copy / "eval" / "embeddings.npy")) == 96  # the trained encoder: every crop
    with pytest.raises(ConfigError, match="'eval.knn_exact_max' must be in"):
        evaluate_run(copy, overrides=["eval.knn_exact_max=-1"])


def test_split_resolution(tmp_path):
    cfg = load_config(recipe_path("demo"), [f"eval.shards={tmp_path / 'set' / 'test'}"])
    for split in ("train", "val", "test"):
        (tmp_path / "set" / split).mkdir(parents=True)
        (tmp_path / "set" / split / "manifest.json").write_text("{}")
    assert eval_shards(cfg) == str(tmp_path / "set" / "test")
    assert eval_shards(cfg, split="val") == str(tmp_path / "set" / "val")  # the sibling split
    assert eval_shards(cfg, shards=str(tmp_path / "set"), split="train") == str(tmp_path / "set" / "train")
    with pytest.raises(ConfigError, match="No split 'holdout'"):
        eval_shards(cfg, split="holdout")


@pytest.mark.slow
def test_two_ranks_under_accelerate_launch_equal_one_process(evaluated, tmp_path):
    import shutil
    import subprocess
    import sys

    _, run, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "report.html", "probed.html"))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch" / "cpu-2proc.yaml"), "-m", "sslkit",
           "evaluate", str(copy), "eval.projection=tsne", "eval.restarts=1", "eval.knn_k=5", "eval.gallery=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Written to") == 1  # one process scores and writes; the other helped embed
    one = json.loads((run / "eval" / "metrics.json").read_text())
    two = json.loads((copy / "eval" / "metrics.json").read_text())
    assert two["num_samples"] == one["num_samples"] == 96
    for block in ("cluster", "knn"):
        assert two[block] == one[block]
        for name in ("raw_pixels", "random_init"):
            assert two["baselines"][name][block] == one["baselines"][name][block]
    # The probe refits on features that differ by float round-off between batch layouts.
    assert two["probe"]["accuracy"] == pytest.approx(one["probe"]["accuracy"], abs=0.03)
