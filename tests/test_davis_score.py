"""score_davis end to end on a tiny synthetic DAVIS tree, plus the indexed-PNG helpers."""
import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from cosettle.eval.frame.davis_score import format_table, score_davis
from cosettle.eval.frame.palette import davis_palette, read_indexed_png, save_indexed_png

H, W = 20, 30


def labels_with(*objects):
    """A label map with object id k on the 4x4 square at (top, left) given as (k, top, left)."""
    labels = np.zeros((H, W), np.uint8)
    for k, top, left in objects:
        labels[top:top + 4, left:left + 4] = k
    return labels


def write_sequence(root, name, annotations, split="val"):
    for t, labels in enumerate(annotations):
        frame = root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"
        frame.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(frame)
        save_indexed_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", labels)
    split_file = root / "ImageSets" / "2017" / f"{split}.txt"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    with open(split_file, "a") as handle:
        handle.write(name + "\n")


def write_predictions(predictions, name, frames):
    for t, labels in enumerate(frames):
        save_indexed_png(predictions / name / f"{t:05d}.png", labels)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def two_sequences(tmp_path):
    """seq-a: one object predicted perfectly; seq-b: three objects, nothing predicted."""
    root, predictions = tmp_path / "DAVIS", tmp_path / "pred"
    seq_a = [labels_with((1, 2, 2))] * 5
    seq_b = [labels_with((1, 2, 2), (2, 2, 10), (3, 10, 10))] * 5
    write_sequence(root, "seq-a", seq_a)
    write_sequence(root, "seq-b", seq_b)
    write_predictions(predictions, "seq-a", seq_a)
    write_predictions(predictions, "seq-b", [np.zeros((H, W), np.uint8)] * 5)
    return root, predictions


def test_objects_are_pooled_across_sequences(two_sequences, tmp_path):
    root, predictions = two_sequences
    summary = score_davis(root, predictions, out=tmp_path / "out")
    # 4 objects: J = F = 1 for the one of seq-a, 0 for the three of seq-b (per-sequence pooling: 0.5)
    assert summary["J-Mean"] == pytest.approx(0.25)
    assert summary["F-Mean"] == pytest.approx(0.25)
    assert summary["J&F-Mean"] == pytest.approx(0.25)
    assert summary["J-Recall"] == pytest.approx(0.25)
    assert summary["J-Decay"] == pytest.approx(0.0)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == pytest.approx(summary)
    objects = read_csv(tmp_path / "out" / "per_object.csv")
    assert [(o["sequence"], o["object"]) for o in objects] == [
        ("seq-a", "1"), ("seq-b", "1"), ("seq-b", "2"), ("seq-b", "3")]
    assert [float(o["J-Mean"]) for o in objects] == [1.0, 0.0, 0.0, 0.0]
    sequences = read_csv(tmp_path / "out" / "per_sequence.csv")
    assert [(s["sequence"], s["objects"], float(s["J&F-Mean"])) for s in sequences] == [
        ("seq-a", "1", 1.0), ("seq-b", "3", 0.0)]
    table = format_table(summary)
    assert "J&F-Mean" in table.splitlines()[0] and "0.250" in table.splitlines()[1]


def test_recall_and_decay_over_frames(tmp_path):
    root, predictions = tmp_path / "DAVIS", tmp_path / "pred"
    gt = [labels_with((1, 2, 2))] * 6
    write_sequence(root, "seq", gt)
    empty = np.zeros((H, W), np.uint8)
    # scored frames 1..4: right, right, empty, empty -> J = F = [1, 1, 0, 0]
    write_predictions(predictions, "seq", [gt[0], gt[1], gt[2], empty, empty, empty])
    summary = score_davis(root, predictions)
    for measure in "JF":
        assert summary[f"{measure}-Mean"] == pytest.approx(0.5)
        assert summary[f"{measure}-Recall"] == pytest.approx(0.5)
        assert summary[f"{measure}-Decay"] == pytest.approx(1.0)  # bins 0..1 and 2..3 of 4 frames


def test_void_is_background_and_ids_beyond_frame_zero_are_missing_objects(tmp_path):
    root, predictions = tmp_path / "DAVIS", tmp_path / "pred"
    gt = labels_with((1, 2, 2))
    gt[2:6, 6:8] = 255  # 8 void pixels beside the 16-pixel object
    write_sequence(root, "seq", [gt] * 3)
    pred = labels_with((1, 2, 2))
    pred[2:6, 6:8] = 1  # the void predicted as the object counts as a false positive
    write_predictions(predictions, "seq", [gt, pred, gt])
    assert score_davis(root, predictions)["J-Mean"] == pytest.approx(16 / 24)


def test_missing_predicted_object_counts_as_empty(tmp_path):
    root, predictions = tmp_path / "DAVIS", tmp_path / "pred"
    gt = labels_with((1, 2, 2), (2, 10, 10))
    write_sequence(root, "seq", [gt] * 3)
    write_predictions(predictions, "seq", [labels_with((1, 2, 2))] * 3)
    summary = score_davis(root, predictions)
    assert summary["J-Mean"] == pytest.approx(0.5)
    assert summary["F-Mean"] == pytest.approx(0.5)


def test_results_are_not_cached(two_sequences):
    root, predictions = two_sequences
    assert score_davis(root, predictions)["J-Mean"] == pytest.approx(0.25)
    write_predictions(predictions, "seq-b", [labels_with((1, 2, 2), (2, 2, 10), (3, 10, 10))] * 5)
    assert score_davis(root, predictions)["J-Mean"] == pytest.approx(1.0)


def test_prediction_of_the_wrong_size(two_sequences):
    root, predictions = two_sequences
    bad = predictions / "seq-a" / "00002.png"
    save_indexed_png(bad, np.zeros((H, W + 1), np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"{bad}: prediction is 31x20 but ground truth ") + ".* is 30x20"):
        score_davis(root, predictions)


def test_predicted_id_above_the_object_count(two_sequences):
    root, predictions = two_sequences
    bad = predictions / "seq-a" / "00001.png"
    save_indexed_png(bad, labels_with((2, 2, 2)))
    with pytest.raises(ValueError, match=re.escape(f"{bad}: predicted id 2 exceeds the 1 object")):
        score_davis(root, predictions)


def test_missing_predicted_frame(two_sequences):
    root, predictions = two_sequences
    missing = predictions / "seq-b" / "00003.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: missing predicted frame")):
        score_davis(root, predictions)


def test_first_and_last_predicted_frames_are_not_needed(two_sequences):
    root, predictions = two_sequences
    (predictions / "seq-a" / "00000.png").unlink()
    (predictions / "seq-a" / "00004.png").unlink()
    assert score_davis(root, predictions)["J-Mean"] == pytest.approx(0.25)


def test_missing_sequence_and_annotation(two_sequences):
    root, predictions = two_sequences
    for frame in (predictions / "seq-b").iterdir():
        frame.unlink()
    (predictions / "seq-b").rmdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{predictions / 'seq-b'}: missing predictions")):
        score_davis(root, predictions)
    annotation = root / "Annotations" / "480p" / "seq-a" / "00002.png"
    annotation.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{annotation}: missing annotation")):
        score_davis(root, predictions)
    with pytest.raises(FileNotFoundError, match="test.txt: split list not found"):
        score_davis(root, predictions, split="test")


def test_palette_colours():
    palette = davis_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:6].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128]]
    assert palette[8].tolist() == [64, 0, 0]
    assert palette[255].tolist() == [224, 224, 192]  # the familiar void colour


def test_indexed_png_round_trip_and_errors(tmp_path):
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    save_indexed_png(tmp_path / "a.png", labels)
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == "P"
        assert image.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    np.testing.assert_array_equal(read_indexed_png(tmp_path / "a.png"), labels)
    Image.fromarray(labels).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_indexed_png(tmp_path / "grey.png"), labels)
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png: expected an indexed .* mode 'RGB'"):
        read_indexed_png(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="junk.png: not a readable image"):
        read_indexed_png(tmp_path / "junk.png")
    with pytest.raises(FileNotFoundError, match="none.png: file not found"):
        read_indexed_png(tmp_path / "none.png")
    with pytest.raises(ValueError, match="uint8"):
        save_indexed_png(tmp_path / "b.png", labels.astype(np.int32))
