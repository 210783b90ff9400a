"""The CLI through click's test runner: the happy path and every bad-input case (one line, non-zero, no traceback)."""
import json
import shutil

import pytest
from click.testing import CliRunner

from tfbitmeta.cli import main
from tfbitmeta.data import datasets


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, text):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error:") and text in lines[-1], result.output


def test_train_prints_table_and_writes_results(tiny_run):
    meta = json.loads((tiny_run / "run.json").read_text())
    assert meta["normalization"]["image_size"] == [24, 24] and len(meta["normalization"]["mean"]) == 1
    res = json.loads((tiny_run / "results.json").read_text())
    assert [r["bits"] for r in res["rows"]] == ["2", "4", "8", "fp"]
    assert all(0.0 <= r["logits"] <= 1.0 for r in res["rows"])
    # the printed table: a header naming the heads, then one row per bitwidth with the accuracies of results.json
    lines = (tiny_run.parent / "tiny_train_output.txt").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "test accuracy of ONE checkpoint" in line)
    header = lines[start + 1].split()
    assert header[0] == "bits" and "logits" in header and "exit3" in header, lines
    printed = {cells[0]: cells[1:] for cells in (line.split() for line in lines[start + 2:start + 6])}
    assert list(printed) == ["2", "4", "8", "fp"], lines
    for row in res["rows"]:
        for col, cell in zip(header[1:], printed[row["bits"]]):
            assert cell == f"{100 * row[col]:.2f}%", (col, row, lines)
    assert f"wrote {tiny_run / 'results.json'}" in "\n".join(lines)
    assert (tiny_run / "accuracy_vs_bits.png").stat().st_size > 1000
    assert list((tiny_run / "tb").iterdir())


def test_evaluate_subset_and_pairs(tiny_run, tmp_path):
    r = run("evaluate", tiny_run, "--bits", "2,4/8,fp", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert "w4a8" in r.output and "fp" in r.output
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [x["bits"] for x in rows] == ["2", "w4a8", "fp"]


def test_bitwidth_outside_candidate_set(tiny_run):
    assert_user_error(run("evaluate", tiny_run, "--bits", "3"), "not in the model's candidate set")
    assert_user_error(run("train", "--bits", "40", "--out", "unused"), "bad bitwidth")
    assert_user_error(run("train", "--method", "dedicated", "--bits", "2,4", "--out", "unused"), "one value")


def test_unknown_dataset_and_model(tmp_path):
    assert_user_error(run("train", "--dataset", "cifar11", "--out", tmp_path / "a"), "unknown dataset")
    assert_user_error(run("train", "--model", "vgg", "--out", tmp_path / "b"), "unknown model")


def test_library_errors_get_their_flag_from_the_cli(tmp_path):
    """Library messages name arguments, not flags; the CLI appends the flag of the argument at fault."""
    assert_user_error(run("train", "--model", "vgg", "--out", tmp_path / "a"), "(--model)")
    r = run("train", "--batch-size", "100000", "--steps", "1", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: batch size 100000 is larger than the training set (1294 images) (--batch-size)"], r.output


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_DIRS", [tmp_path / "nowhere"])
    import tensorflow as tf

    monkeypatch.setattr(tf.keras.datasets.fashion_mnist, "load_data", lambda: (_ for _ in ()).throw(OSError("offline")))
    assert_user_error(run("train", "--dataset", "fashion_mnist", "--out", tmp_path / "c"),
                      "apt-get install dataset-fashion-mnist")


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("train", "--out", blocker / "sub")
    assert_user_error(r, "cannot write to")
    assert_user_error(r, "(--out)")  # the library names param out; the CLI adds the flag


def test_corrupt_checkpoint_and_metadata(tiny_run, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_run, bad)
    for f in (bad / "model").glob("*.data-*"):
        f.write_bytes(b"\0" * 16)
    assert_user_error(run("evaluate", bad), "corrupt or incompatible checkpoint")
    (bad / "run.json").write_text("{not json")
    assert_user_error(run("evaluate", bad), "corrupt run metadata")


def test_missing_run_and_existing_run(tiny_run, tmp_path):
    assert_user_error(run("evaluate", tmp_path / "nothing"), "no run at")
    assert_user_error(run("train", "--out", tiny_run, "--steps", "1"), "--resume")
    assert_user_error(run("train", "--out", tmp_path / "fresh", "--resume"), "no run at")


@pytest.mark.parametrize("args", [["train", "--method", "sgd"], ["train", "--scheme", "lsq"], ["train"]])
def test_bad_options_are_usage_errors(args):
    r = run(*args)
    assert r.exit_code == 2 and "Traceback" not in r.output
