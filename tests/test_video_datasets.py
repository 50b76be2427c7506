"""Official UCF101/HMDB51 split lists, their reader, and the synthetic motion-only action world."""
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from cosettle.eval.video.datasets import (
    ACTION_DATASETS,
    ActionDataError,
    MissingVideosWarning,
    class_names,
    find_video,
    kinetics400_classes,
    load_split,
    manifests_dir,
    read_split_list,
)
from cosettle.eval.video.synthetic import ACTION_CLASSES, action_clip, write_action_world
from cosettle.pipeline.synthetic import write_frame_folder
from cosettle.pipeline.videos import open_video

# The table of data_manifests/README.md (and shared/data/splits/README.md).
COUNTS = {
    "ucf101": {1: (9537, 3783), 2: (9586, 3734), 3: (9624, 3696)},
    "hmdb51": {1: (3570, 1530), 2: (3570, 1530), 3: (3570, 1530)},
}
NUM_CLASSES = {"ucf101": 101, "hmdb51": 51}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The default 4-class world: 4 train + 2 test videos a class, mp4 and frame folders alternating."""
    return write_action_world(tmp_path_factory.mktemp("world"), seed=3)


def copy_world(world: dict, dest: Path) -> dict:
    shutil.copytree(world["videos"].parent, dest)
    return {**world, "videos": dest / "videos", "lists": dest / "splits"}


def motion_feature(frames: np.ndarray) -> np.ndarray:
    """(vx, vy, motion energy): least-squares brightness-constancy velocity over the pixels that change."""
    g = frames.astype(float).mean(-1)
    it = np.diff(g, axis=0)
    gy, gx = np.gradient(g[:-1], axis=(1, 2))
    changed = np.abs(it) > 8  # above compression noise
    vx = -(it * gx)[changed].sum() / ((gx**2)[changed].sum() + 1e-9)
    vy = -(it * gy)[changed].sum() / ((gy**2)[changed].sum() + 1e-9)
    return np.array([vx, vy, 20 * changed.mean()])


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    classes = np.unique(train_y)
    centroids = np.stack([train_x[train_y == c].mean(0) for c in classes])
    predicted = classes[((test_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    return float((predicted == test_y).mean())


# ---- the shipped lists


@pytest.mark.parametrize("dataset", ACTION_DATASETS)
@pytest.mark.parametrize("split", [1, 2, 3])
def test_shipped_split_counts_and_disjoint(dataset, split):
    folder = manifests_dir() / dataset
    train = read_split_list(folder / f"trainlist{split:02d}.txt")
    test = read_split_list(folder / f"testlist{split:02d}.txt")
    assert (len(train), len(test)) == COUNTS[dataset][split]
    assert not {e for e, _ in train} & {e for e, _ in test}
    labels = {label for _, label in train} | {label for _, label in test}
    assert labels == set(range(NUM_CLASSES[dataset]))


def test_manifests_dir_is_the_repository_folder():
    assert manifests_dir() == Path(__file__).resolve().parents[1] / "data_manifests"
    assert (manifests_dir() / "ucf101" / "classInd.txt").is_file()
    names = kinetics400_classes()
    assert len(names) == 400 and names[0] == "abseiling" and names == sorted(names)


def test_class_names_ucf_from_class_index():
    names = class_names("ucf101")
    assert len(names) == 101
    assert names[0] == "ApplyEyeMakeup" and names[-1] == "YoYo"  # classInd "1 ..." -> label 0


def test_class_names_hmdb_in_official_split_file_order():
    names = class_names("hmdb51")
    assert len(names) == 51 and names[0] == "brush_hair" and names[-1] == "wave"
    # Labels follow the sorted official file names <class>_test_split1.txt, not sorted class names.
    assert names.index("climb_stairs") == 5 and names.index("climb") == 6
    assert names == sorted(names, key=lambda c: c + "_test_split") != sorted(names)


def test_load_split_on_shipped_lists_checks_every_label(tmp_path):
    (tmp_path / "ApplyEyeMakeup").mkdir()
    (tmp_path / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi").write_bytes(b"x")
    with pytest.warns(MissingVideosWarning, match=r"9536 of the 9537 videos of ucf101 split 1 train"):
        videos, report = load_split("ucf101", tmp_path, 1, "train")
    assert [v.name for v in videos] == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01"]
    assert (videos[0].label, videos[0].class_name) == (0, "ApplyEyeMakeup")
    assert (report.listed, report.found, report.missing) == (9537, 1, 9536)
    assert len(report.missing_examples) == 5


def test_load_split_hmdb_frame_folder(tmp_path):
    name = "wave/21_wave_u_nm_np1_fr_goo_5"
    write_frame_folder(tmp_path / name, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.warns(MissingVideosWarning):
        videos, _ = load_split("hmdb51", tmp_path, 1, "train", manifests=manifests_dir())
    assert [(v.name, v.path, v.label, v.class_name) for v in videos] == [(name, tmp_path / name, 50, "wave")]


# ---- the reader on small hand-made lists


def test_find_video_avi_mp4_and_frame_folder(tmp_path):
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "one.avi").write_bytes(b"x")
    (tmp_path / "A" / "two.mp4").write_bytes(b"x")
    write_frame_folder(tmp_path / "A" / "three", np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "A" / "empty").mkdir()
    assert find_video(tmp_path, "A/one.mp4") == tmp_path / "A" / "one.avi"  # UCF lists say .mp4
    assert find_video(tmp_path, "A/one") == tmp_path / "A" / "one.avi"  # HMDB lists have no extension
    assert find_video(tmp_path, "A/two.mp4") == tmp_path / "A" / "two.mp4"
    assert find_video(tmp_path, "A/two") == tmp_path / "A" / "two.mp4"
    assert find_video(tmp_path, "A/three.mp4") == tmp_path / "A" / "three"
    assert find_video(tmp_path, "A/empty.mp4") is None
    assert find_video(tmp_path, "A/four.mp4") is None


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "trainlist01.txt"
    path.write_text("A/a.mp4 0\n\nA/b.mp4\n")
    with pytest.raises(ActionDataError, match=rf"^{path}:3: expected '<class>/<video> <label>'"):
        read_split_list(path)
    for bad in ("a.mp4 0", "A/a.mp4 x", "A/b/c.mp4 0", "/a.mp4 0"):
        path.write_text(bad + "\n")
        with pytest.raises(ActionDataError, match=rf"{path}:1: expected"):
            read_split_list(path)
    path.write_text("A/a.mp4 0\nA/a.mp4 0\n")
    with pytest.raises(ActionDataError, match=rf"{path}:2: A/a.mp4 is listed twice"):
        read_split_list(path)


def test_label_disagreeing_with_class_names_file_and_line(world, tmp_path):
    w = copy_world(world, tmp_path / "w")
    lines = (w["lists"] / "trainlist01.txt").read_text().splitlines()
    lines[2] = lines[2][:-1] + "3"  # a MoveRight video labelled 3
    (w["lists"] / "trainlist01.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ActionDataError, match=r"trainlist01.txt:3: label 3 disagrees with class MoveRight"):
        load_split("ucf101", w["videos"], 1, "train", lists=w["lists"])
    hmdb = tmp_path / "hmdb"
    hmdb.mkdir()
    (hmdb / "trainlist01.txt").write_text("climb/a 0\nclimb_stairs/b 1\n")  # sorted names, not the official order
    with pytest.raises(ActionDataError, match=rf"{hmdb / 'trainlist01.txt'}:1: label 0 disagrees with class climb"):
        class_names("hmdb51", lists=hmdb)


def test_split_subset_and_dataset_validated(world):
    args = dict(lists=world["lists"])
    for split in (0, 4, "1"):
        with pytest.raises(ActionDataError, match="split must be 1, 2 or 3"):
            load_split("ucf101", world["videos"], split, "train", **args)
    with pytest.raises(ActionDataError, match="subset must be 'train' or 'test'"):
        load_split("ucf101", world["videos"], 1, "val", **args)
    with pytest.raises(ActionDataError, match="unknown action dataset 'kinetics'"):
        load_split("kinetics", world["videos"], 1, "train", **args)
    with pytest.raises(ActionDataError, match="trainlist02.txt: cannot read split list"):
        load_split("ucf101", world["videos"], 2, "train", **args)


def test_missing_videos_warn_once_with_count_and_strict_raises(world, tmp_path):
    w = copy_world(world, tmp_path / "w")
    shutil.rmtree(w["videos"] / "MoveLeft")  # 4 train videos, mp4 and frame folders
    with pytest.warns(MissingVideosWarning) as caught:
        videos, report = load_split("ucf101", w["videos"], 1, "train", lists=w["lists"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "4 of the 16 videos of ucf101 split 1 train are missing" in message
    assert "(e.g. MoveLeft/v_MoveLeft_g01_c01)" in message and caught[0].filename == __file__
    assert (len(videos), report.found, report.missing) == (12, 12, 4)
    assert report.missing_examples == [f"MoveLeft/v_MoveLeft_g{i:02d}_c01" for i in range(1, 5)]
    with pytest.raises(ActionDataError, match="4 of the 16 videos"):
        load_split("ucf101", w["videos"], 1, "train", lists=w["lists"], strict=True)


def test_no_video_found_is_an_error_even_when_not_strict(world, tmp_path):
    with pytest.raises(ActionDataError, match=rf"^{tmp_path}: none of the 16 videos of ucf101 split 1 train were found "
                                              r"\(e\.g\. MoveRight/v_MoveRight_g01_c01"):
        load_split("ucf101", tmp_path, 1, "train", lists=world["lists"])
    with pytest.raises(ActionDataError, match="no such ucf101 video folder"):
        load_split("ucf101", tmp_path / "absent", 1, "train", lists=world["lists"])


def test_report_summary_for_provenance(world):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete world warns about nothing
        _, report = load_split("ucf101", world["videos"], 1, "test", lists=world["lists"])
    report.unreadable = 1  # as a decoder would record it
    summary = report.summary()
    assert summary == {"dataset": "ucf101", "split": 1, "subset": "test", "listed": 8, "found": 8, "missing": 0,
                       "missing_examples": [], "list_file": str(world["lists"] / "testlist01.txt"),
                       "root": str(world["videos"]), "unreadable": 1}


# ---- the synthetic action world


def test_world_lists_read_back_in_the_official_format(world):
    lists = world["lists"]
    assert (lists / "classInd.txt").read_text().splitlines() == ["1 MoveRight", "2 MoveLeft", "3 MoveDown", "4 MoveUp"]
    train = read_split_list(lists / "trainlist01.txt")
    assert train[0] == ("MoveRight/v_MoveRight_g01_c01.mp4", 0) and len(train) == world["train"] == 16
    assert class_names("ucf101", lists=lists) == world["classes"] == list(ACTION_CLASSES[:4])
    assert (world["videos"] / "MoveRight" / "v_MoveRight_g01_c01.mp4").is_file()
    assert (world["videos"] / "MoveRight" / "v_MoveRight_g02_c01").is_dir()  # .mp4 in the list all the same


def test_world_videos_decode_and_motion_separates_classes(world):
    features, labels = {}, {}
    for subset in ("train", "test"):
        videos, _ = load_split(world["dataset"], world["videos"], 1, subset, lists=world["lists"])
        assert {v.path.suffix for v in videos} == {".mp4", ""}
        clips = []
        for v in videos:
            video = open_video(v.path)
            assert len(video) == world["frames"]
            clips.append(video.get(list(range(len(video)))))
        assert clips[0].shape == (16, 64, 64, 3)
        features[subset] = np.stack([motion_feature(c) for c in clips])
        labels[subset] = np.array([v.label for v in videos])
    assert nearest_centroid_accuracy(features["train"], labels["train"], features["test"], labels["test"]) == 1.0


def test_single_frame_carries_no_class_information_but_motion_does():
    # All seven classes, 24 clips each, in memory: a larger sample than the written world.
    clips, labels = [], []
    for label, name in enumerate(ACTION_CLASSES):
        for i in range(24):
            clips.append(action_clip(name, 16, 32, 32, seed=1000 * label + i))
            labels.append(label)
    clips, labels = np.stack(clips), np.array(labels)
    train = np.arange(len(labels)) % 2 == 0
    chance = 1 / len(ACTION_CLASSES)
    for t in (0, 7, 15):
        pixels = clips[:, t].reshape(len(clips), -1).astype(float)
        accuracy = nearest_centroid_accuracy(pixels[train], labels[train], pixels[~train], labels[~train])
        assert accuracy < chance + 0.15, f"frame {t}: single-frame accuracy {accuracy:.2f}"
    motion = np.stack([motion_feature(c) for c in clips])
    assert nearest_centroid_accuracy(motion[train], labels[train], motion[~train], labels[~train]) > 0.9


def test_world_is_deterministic_and_validated(tmp_path):
    a = write_action_world(tmp_path / "a", classes=2, train_per_class=1, test_per_class=1, frames=4, seed=5,
                           formats=("frames",))
    b = write_action_world(tmp_path / "b", classes=2, train_per_class=1, test_per_class=1, frames=4, seed=5,
                           formats=("frames",))
    one = "MoveLeft/v_MoveLeft_g02_c01"
    assert np.array_equal(open_video(a["videos"] / one).get([0, 3]), open_video(b["videos"] / one).get([0, 3]))
    for bad in (dict(classes=8), dict(frames=1), dict(height=63), dict(formats=("gif",))):
        with pytest.raises(ValueError):
            write_action_world(tmp_path / "c", **bad)


def test_a_backdrop_gives_each_class_its_background():
    looks = {name: np.full((32, 32, 3), 60 + 100 * i, np.uint8) for i, name in enumerate(ACTION_CLASSES[:2])}
    for name, look in looks.items():
        clip = action_clip(name, 4, 32, 32, seed=3, backdrop=lambda c, rng: looks[c])
        shown = np.all(clip == look, axis=-1)  # [T, H, W]: pixels showing the class's backdrop
        # everywhere but under the object (an ellipse of 10-16% radii), and the object still moves
        assert 0.8 < shown.mean() < 1.0 and not np.array_equal(shown[0], shown[-1])
    with pytest.raises(ValueError, match="backdrop"):
        action_clip("MoveLeft", 4, 32, 32, seed=3, backdrop=lambda c, rng: np.zeros((16, 16, 3), np.uint8))
