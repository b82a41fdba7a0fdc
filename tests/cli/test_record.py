"""``pgolf record``: the record folder of a real 3-seed tiny sweep. The consistency test parses the README table,
submission.json and the copied logs' final lines with its own parsers and requires the same numbers in all three."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from pgolf_lit.tools.record import RecordError, build_record
from pgolf_lit.tools.seeds import load_results
from test_seeds import SEEDS, finished_sweep, pgolf, sweep_cwd

META = {
    "name": "Tiny PR 1421",
    "author": "Test Author",
    "github_id": "tester",
    "date": "2026-04-20",
    "track": "10min_16mb",
    "blurb": "A CPU sweep.",
}


# Every test here reads one 3-seed sweep of a tiny record (~35 s on 2 cores): the slow suite.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, embedded_data_root) -> Path:
    return finished_sweep(tmp_path_factory, embedded_data_root)


def readme_table(text: str) -> dict[str, dict[str, str]]:
    """The README's results table as {first cell: {column title: cell}}."""
    rows = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells))) for cells in rows[1:]}


def log_line(path: Path, label: str) -> tuple[float, float]:
    """val_loss and val_bpb of the last line of ``path`` starting with ``label val_loss:``."""
    lines = [line for line in path.read_text().splitlines() if line.startswith(f"{label} val_loss:")]
    fields = dict(item.split(":", 1) for item in lines[-1][len(label) + 1 :].split())
    return float(fields["val_loss"]), float(fields["val_bpb"])


def test_readme_submission_and_logs_agree(sweep, tmp_path, tmp_path_factory, embedded_data_root):
    out = tmp_path / "records" / "tiny_pr1421"
    losses = [e["val_loss"] for e in load_results(sweep)["seeds"]]
    baseline = statistics.mean(losses) + 0.005 + 10 * statistics.stdev(losses) / math.sqrt(3)  # t = 10: holds
    run = pgolf(
        "record",
        "--results",
        str(sweep),
        "--out",
        str(out),
        "--name",
        META["name"],
        "--github-id",
        "tester",
        "--blurb",
        META["blurb"],
        "--baseline",
        repr(baseline),
        cwd=sweep_cwd(tmp_path_factory, embedded_data_root, "shared_sweep"),
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "submission.json", "config.yaml", "artifact_code.py", "manifest.json"]
        + [f"{kind}_seed{s}.log" for s in SEEDS for kind in ("train", "eval")]
    )
    readme = (out / "README.md").read_text()
    submission = json.loads((out / "submission.json").read_text())
    table = readme_table(readme)
    assert submission["github_id"] == submission["author"] == "tester" and submission["name"] == META["name"]
    assert submission["seeds"] == list(SEEDS) and submission["val_bpb_method"] == "sliding (final_int6_sliding_window)"

    for seed in SEEDS:
        row, result = table[str(seed)], submission["seed_results"][str(seed)]
        train_log, eval_log = out / f"train_seed{seed}.log", out / f"eval_seed{seed}.log"
        train_lines = train_log.read_text().splitlines()
        last_step = [line for line in train_lines if line.startswith("step:")][-1]
        steps, train_time = re.match(r"step:(\d+)/\d+ .*train_time:(\d+)ms", last_step).groups()
        assert int(row["Steps"]) == result["steps"] == int(steps)
        assert int(row["Train time (ms)"]) == result["train_time_ms"] == int(train_time)
        pre_line = next(line for line in train_lines if line.startswith("pre-quantization"))
        pre_bpb = float(re.search(r"val_bpb:(\S+)", pre_line).group(1))
        assert float(row["Pre-quant val_bpb"]) == result["pre_quant_val_bpb"] == pre_bpb
        roundtrip_bpb = log_line(train_log, "final_int6_roundtrip")[1]
        assert float(row["Roundtrip val_bpb"]) == result["roundtrip_val_bpb"] == roundtrip_bpb
        sliding_loss, sliding_bpb = log_line(eval_log, "final_int6_sliding_window")
        assert float(row["sliding val_bpb (scored)"]) == result["val_bpb"] == result["sliding_val_bpb"] == sliding_bpb
        assert float(row["sliding val_loss (scored)"]) == result["val_loss"] == sliding_loss
        standard_bpb = log_line(eval_log, "final_int6_roundtrip")[1]  # the standard pass keeps upstream's label
        assert float(row["standard val_bpb"]) == result["standard_val_bpb"] == standard_bpb
        total = next(line for line in train_lines if line.startswith("Serialized model bytes:")).rsplit("total:", 1)[1]
        assert int(row["Artifact bytes"].replace(",", "")) == result["artifact_bytes"] == int(total)

    logged_bpb = [log_line(out / f"eval_seed{s}.log", "final_int6_sliding_window")[1] for s in SEEDS]
    logged_loss = [log_line(out / f"eval_seed{s}.log", "final_int6_sliding_window")[0] for s in SEEDS]
    mean_bpb, std_bpb = round(statistics.mean(logged_bpb), 8), round(statistics.stdev(logged_bpb), 8)
    assert float(table["Mean"]["sliding val_bpb (scored)"]) == submission["val_bpb"] == mean_bpb
    assert float(table["Std"]["sliding val_bpb (scored)"]) == submission["val_bpb_std"] == std_bpb
    mean_loss = round(statistics.mean(logged_loss), 8)
    assert float(table["Mean"]["sliding val_loss (scored)"]) == submission["val_loss"] == mean_loss
    assert submission["bytes_total"] == max(submission["seed_results"][str(s)]["artifact_bytes"] for s in SEEDS)
    assert f"**val_bpb {submission['val_bpb']:.8f}** (3-seed mean, std {submission['val_bpb_std']:.8f})" in readme

    verdict = submission["significance"]["verdict"]
    assert verdict.startswith("claim holds: p = ") and verdict.endswith("< 0.01 for improvement ≥ 0.005 nats")
    assert f"**{verdict}**" in readme and f"{verdict} (original policy, the verdict)" in run.stdout
    # the final policy needs the frontier's seeds: against one number it is reported as not tested
    assert submission["significance_policies"]["final"]["not_tested"].startswith("the final policy's Welch test")
    assert "**final policy** (also tested)" in readme and "final policy (also tested): not tested:" in run.stdout

    # What ships, measured from the files: the code file written here plus each seed's artifact, equal to the
    # totals the logs counted; the manifest holds every seed's run manifests and the sha256 of every file here.
    manifest = json.loads((out / "manifest.json").read_text())
    results = load_results(sweep)
    code_bytes = (out / "artifact_code.py").stat().st_size
    for entry in results["seeds"]:
        model = (sweep.parent / entry["artifact"]).stat().st_size
        assert code_bytes + model == submission["seed_results"][str(entry["seed"])]["artifact_bytes"]
        shipped = manifest["shipped"]["models"][str(entry["seed"])]
        assert (shipped["bytes"], shipped["total"]) == (model, code_bytes + model)
        runs = manifest["seeds"][str(entry["seed"])]
        assert runs["fit"]["seed"] == entry["seed"] and (runs["fit"]["stage"], runs["test"]["stage"]) == ("fit", "test")
        assert runs["fit"]["dataset"]["train_shards"]["count"] >= 1
    largest = max(code_bytes + (sweep.parent / e["artifact"]).stat().st_size for e in results["seeds"])
    assert manifest["shipped"]["largest_total_bytes"] == largest
    assert f"= {largest:,} bytes, within the 16,000,000-byte limit" in run.stdout
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    assert manifest["files"]["README.md"]["sha256"] == hashlib.sha256((out / "README.md").read_bytes()).hexdigest()
    assert "tested metric: val_loss (nats/token) of the 'sliding' pass (final_int6_sliding_window)" in readme
    # the logs are unmodified copies; the config is seed 42's run config
    for seed in SEEDS:
        runs = sweep.parent / f"seed_{seed}"
        assert (out / f"train_seed{seed}.log").read_bytes() == (runs / "fit" / "train.log").read_bytes()
        assert (out / f"eval_seed{seed}.log").read_bytes() == (runs / "test" / "train.log").read_bytes()
    assert yaml.safe_load((out / "config.yaml").read_text())["seed_everything"] == 42


def test_a_claim_that_does_not_hold_is_said_plainly(sweep, tmp_path):
    losses = [e["val_loss"] for e in load_results(sweep)["seeds"]]
    doc = build_record(sweep, tmp_path / "rec", META, baseline_arg=repr(statistics.mean(losses) + 0.005))
    assert doc["significance"]["holds"] is False
    assert "**claim does NOT hold: p = " in (tmp_path / "rec" / "README.md").read_text()


def test_without_a_baseline_the_readme_says_nothing_was_tested(sweep, tmp_path):
    doc = build_record(sweep, tmp_path / "rec", META)
    assert "significance" not in doc
    assert "Not tested: no baseline was given" in (tmp_path / "rec" / "README.md").read_text()


def test_results_that_disagree_with_the_logs_are_refused(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep.parent, copy)
    results = json.loads((copy / "results.json").read_text())
    results["seeds"][1]["sliding_val_bpb"] += 1e-6  # a hand edit, as in the review comments
    (copy / "results.json").write_text(json.dumps(results))
    with pytest.raises(
        RecordError,
        match=r"seed 1337: sliding_val_bpb is \S+ in .*seed_1337/fit/train.log and .*"
        r"seed_1337/test/train.log but \S+ in .*results.json",
    ):
        build_record(copy / "results.json", tmp_path / "rec", META)
    assert not (tmp_path / "rec").exists()


def test_seeds_of_different_configs_are_refused(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep.parent, copy)
    config_path = copy / "seed_2024" / "fit" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["model"]["optim"]["matrix_lr"] *= 2
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(RecordError, match=r"seed 2024 ran another config than seed 42 \(differs in \['model'\]\)"):
        build_record(copy / "results.json", tmp_path / "rec", META)


def test_the_final_policy_gives_the_verdict_when_asked(sweep, tmp_path):
    doc = build_record(sweep, tmp_path / "rec", META, baseline_arg=[str(sweep)], policy="final")
    assert doc["significance"]["policy"] == "final" and doc["significance"]["test"] == "welch"
    assert doc["significance"]["holds"] is False  # against itself
    assert doc["significance_policies"]["original"]["holds"] is False
    with pytest.raises(RecordError, match="--policy final: the final policy's Welch test needs"):
        build_record(sweep, tmp_path / "rec2", META, baseline_arg="2.0", policy="final")


def test_runs_that_trained_on_validation_documents_or_lack_a_manifest_are_refused(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep.parent, copy)
    path = copy / "seed_1337" / "fit" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["dataset"]["val_disjointness"].update(dropped=0, val_docs_in_train=3)
    path.write_text(json.dumps(manifest))
    with pytest.raises(RecordError, match="seed 1337: the data manifest .* shows 3 validation documents in the train"):
        build_record(copy / "results.json", tmp_path / "rec", META)
    path.unlink()
    with pytest.raises(RecordError, match="seed_1337/fit/manifest.json: not found"):
        build_record(copy / "results.json", tmp_path / "rec", META)
    assert not (tmp_path / "rec").exists()


def test_an_existing_record_folder_is_not_overwritten(sweep, tmp_path):
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "README.md").write_text("mine")
    with pytest.raises(RecordError, match="rec: exists and is not empty"):
        build_record(sweep, tmp_path / "rec", META)
    assert (tmp_path / "rec" / "README.md").read_text() == "mine"
