"""Readers of the official UCF101 / HMDB51 train/test split lists, and the videos they name.

The lists ship in the repository under ``data_manifests/<dataset>/`` (``trainlist0N.txt``,
``testlist0N.txt`` and, for UCF101, ``classInd.txt``), one ``<Class>/<video> <label>`` a line
with 0-based labels. They are not package data: the package is installed editable from the
repository, and ``manifests_dir()`` finds them next to the source folders. Any other folder can
be passed as ``manifests`` (holding ``ucf101/``, ``hmdb51/``) or ``lists`` (holding the list
files themselves, e.g. a synthetic world's ``splits/``).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from cosettle.pipeline.concepts import KINETICS400_FILE, ConceptError
from cosettle.pipeline.concepts import kinetics400_classes as read_kinetics400_classes
from cosettle.pipeline.videos import IMAGE_EXTS, VIDEO_EXTS

ACTION_DATASETS = ("ucf101", "hmdb51")
SUBSETS = ("train", "test")
SPLITS = (1, 2, 3)
# UCF101 lists name ``.mp4`` files but the release ships ``.avi``; HMDB51 names carry no extension.
VIDEO_SUFFIXES = (".avi", ".mp4")
_LINE_FORMAT = "'<class>/<video> <label>'"


class ActionDataError(Exception):
    """A split list or dataset folder that cannot be used; the message is one line naming the file."""


class MissingVideosWarning(UserWarning):
    """Some videos of a split list were not found under the dataset root."""


@dataclass(frozen=True)
class ActionVideo:
    """One video of a split: ``name`` is the list entry without extension (``Class/video``)."""

    name: str
    path: Path
    label: int
    class_name: str


@dataclass
class SplitReport:
    """What a split list promised and what the dataset root held, for provenance.

    ``unreadable`` is filled in later by whoever decodes the videos.
    """

    dataset: str
    split: int
    subset: str
    listed: int
    found: int
    missing: int
    missing_examples: list[str] = field(default_factory=list)
    list_file: str = ""
    root: str = ""
    unreadable: int = 0

    def summary(self) -> dict:
        """A JSON-ready dict of the report."""
        return dataclasses.asdict(self)


def manifests_dir() -> Path:
    """The repository's ``data_manifests/`` folder.

    It is found relative to this source file (``<repo>/eval/video/datasets.py``), which works
    because the package is installed editable; a non-editable install has no such folder, so
    pass ``manifests=`` or ``lists=`` explicitly there.
    """
    return Path(__file__).resolve().parents[2] / "data_manifests"


def lists_dir(dataset: str, manifests: Path | None = None, lists: Path | None = None) -> Path:
    """The folder holding a dataset's list files: ``lists`` itself, else ``manifests/<dataset>``."""
    check_dataset(dataset)
    folder = Path(lists) if lists is not None else Path(manifests or manifests_dir()) / dataset
    if not folder.is_dir():
        raise ActionDataError(f"{folder}: no such folder of {dataset} split lists")
    return folder


def check_dataset(dataset: str) -> None:
    """Reject a dataset name other than those of ACTION_DATASETS."""
    if dataset not in ACTION_DATASETS:
        raise ActionDataError(f"unknown action dataset {dataset!r}; expected one of {', '.join(ACTION_DATASETS)}")


def split_list_path(folder: Path, split: int, subset: str) -> Path:
    """``<folder>/trainlist0N.txt`` or ``testlist0N.txt``, after validating split and subset."""
    if isinstance(split, bool) or split not in SPLITS:
        raise ActionDataError(f"split must be 1, 2 or 3, got {split!r}")
    if subset not in SUBSETS:
        raise ActionDataError(f"subset must be 'train' or 'test', got {subset!r}")
    return Path(folder) / f"{subset}list{split:02d}.txt"


def _numbered_entries(path: Path) -> list[tuple[int, str, int]]:
    """(line number, entry, label) of a split list; blank and '#' lines skipped."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ActionDataError(f"{path}: cannot read split list ({e.strerror or e})") from None
    rows, seen = [], {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry, label = _parse_line(line)
        if entry is None:
            raise ActionDataError(f"{path}:{n}: expected {_LINE_FORMAT}, got {line[:80]!r}")
        if entry in seen:
            raise ActionDataError(f"{path}:{n}: {entry} is listed twice (first on line {seen[entry]})")
        seen[entry] = n
        rows.append((n, entry, label))
    if not rows:
        raise ActionDataError(f"{path}: the split list is empty")
    return rows


def _parse_line(line: str) -> tuple[str | None, int]:
    """Split ``Class/video label``; (None, -1) when the line does not have that shape."""
    parts = line.rsplit(None, 1)
    if len(parts) != 2 or not parts[1].isdigit():
        return None, -1
    cls, sep, video = parts[0].partition("/")
    if not (sep and cls and video) or "/" in video:
        return None, -1
    return parts[0], int(parts[1])


def read_split_list(path: Path) -> list[tuple[str, int]]:
    """The (entry, label) pairs of an official split list, 0-based labels, in file order."""
    return [(entry, label) for _, entry, label in _numbered_entries(path)]


def entry_name(entry: str) -> str:
    """A list entry without its video extension (``Class/video.mp4`` -> ``Class/video``)."""
    # Only known video suffixes are dropped: HMDB names may hold other dots in principle.
    stem, ext = os.path.splitext(entry)
    return stem if ext.lower() in VIDEO_EXTS else entry


def class_names(dataset: str, manifests: Path | None = None, *, lists: Path | None = None) -> list[str]:
    """The class names, index = 0-based label.

    UCF101: ``classInd.txt`` (1-based in the file). HMDB51: the class folders of all list
    entries in the order of the official ``<class>_test_split<n>.txt`` file names -- alphabetical
    except that ``climb_stairs``, ``kick_ball`` and ``sword_exercise`` precede ``climb``, ``kick``
    and ``sword``; every entry's label is checked against it.
    """
    folder = lists_dir(dataset, manifests, lists)
    if dataset == "ucf101":
        return read_class_index(folder / "classInd.txt")
    return _hmdb_class_names(folder)


def read_class_index(path: Path) -> list[str]:
    """UCF101's ``classInd.txt``: ``<1-based index> <name>`` lines, indices 1..K in order."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ActionDataError(f"{path}: cannot read class index ({e.strerror or e})") from None
    names: list[str] = []
    for n, raw in enumerate(lines, start=1):
        parts = raw.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[0] != str(len(names) + 1):
            raise ActionDataError(f"{path}:{n}: expected '{len(names) + 1} <class>', got {raw.strip()[:80]!r}")
        if parts[1] in names:
            raise ActionDataError(f"{path}:{n}: class {parts[1]} is listed twice")
        names.append(parts[1])
    if not names:
        raise ActionDataError(f"{path}: the class index is empty")
    return names


def _hmdb_class_names(folder: Path) -> list[str]:
    """Class folders of every split list in ``folder``, in the official split-file order."""
    files = sorted(folder.glob("*list0[1-9].txt"))
    if not files:
        raise ActionDataError(f"{folder}: no trainlist0N.txt / testlist0N.txt split lists")
    rows = {f: _numbered_entries(f) for f in files}
    folders = {entry.split("/", 1)[0] for r in rows.values() for _, entry, _ in r}
    # Labels follow the sorted official file names <class>_test_split1.txt, not sorted class names.
    names = sorted(folders, key=lambda c: c + "_test_split")
    for f, r in rows.items():
        check_labels(f, r, names)
    return names


def check_labels(path: Path, rows: list[tuple[int, str, int]], names: list[str]) -> None:
    """Every entry's label must be the index of its class folder in ``names``."""
    index = {name: i for i, name in enumerate(names)}
    for n, entry, label in rows:
        cls = entry.split("/", 1)[0]
        if cls not in index:
            raise ActionDataError(f"{path}:{n}: class {cls} is not among the {len(names)} classes")
        if label != index[cls]:
            raise ActionDataError(
                f"{path}:{n}: label {label} disagrees with class {cls} (label {index[cls]}; labels are 0-based)"
            )


def find_video(root: Path, entry: str) -> Path | None:
    """The video a list entry names under ``root``: ``<stem>.avi``, ``<stem>.mp4`` or a frame folder.

    The entry's own extension is tried first; a folder counts only if it holds an image file.
    """
    stem = Path(root) / entry_name(entry)
    own = Path(root) / entry
    for candidate in (own, *(stem.with_name(stem.name + s) for s in VIDEO_SUFFIXES)):
        if candidate != stem and candidate.is_file():
            return candidate
    return stem if _is_frame_folder(stem) else None


def _is_frame_folder(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return any(e.name.lower().endswith(IMAGE_EXTS) for e in it)
    except (NotADirectoryError, FileNotFoundError):
        return False


def load_split(
    dataset: str,
    root: Path,
    split: int,
    subset: str,
    manifests: Path | None = None,
    strict: bool = False,
    *,
    lists: Path | None = None,
) -> tuple[list[ActionVideo], SplitReport]:
    """The videos of one official split found under ``root``, and a report of what was missing.

    Missing videos raise a MissingVideosWarning (an ActionDataError when ``strict``); finding
    none of them is always an error. ``lists`` points at a folder of list files directly.
    """
    folder = lists_dir(dataset, manifests, lists)
    path = split_list_path(folder, split, subset)
    root = Path(root)
    if not root.is_dir():
        raise ActionDataError(f"{root}: no such {dataset} video folder")
    names = class_names(dataset, lists=folder)
    rows = _numbered_entries(path)
    check_labels(path, rows, names)
    videos, missing = [], []
    for _, entry, label in rows:
        found = find_video(root, entry)
        if found is None:
            missing.append(entry_name(entry))
        else:
            videos.append(ActionVideo(entry_name(entry), found, label, names[label]))
    report = SplitReport(dataset, split, subset, len(rows), len(videos), len(missing), missing[:5],
                         str(path), str(root))
    _report_missing(report, missing, strict)
    return videos, report


def _report_missing(report: SplitReport, missing: list[str], strict: bool) -> None:
    """Warn (or raise) about missing videos in one line; never drop them silently."""
    if not missing:
        return
    what = f"{report.dataset} split {report.split} {report.subset}"
    if report.found == 0:
        raise ActionDataError(
            f"{report.root}: none of the {report.listed} videos of {what} were found "
            f"(e.g. {missing[0]}; looked for .avi, .mp4 and frame folders)"
        )
    message = (f"{report.root}: {report.missing} of the {report.listed} videos of {what} are missing "
               f"(e.g. {missing[0]})")
    if strict:
        raise ActionDataError(message)
    warnings.warn(message + "; pass strict=True to make this an error", MissingVideosWarning, stacklevel=3)


def kinetics400_classes(manifests: Path | None = None) -> list[str]:
    """The 400 Kinetics-400 class names of ``kinetics400_classes.txt``, line i = label i
    (read by ``cosettle.pipeline.concepts.kinetics400_classes``, which the concepts vocabulary uses)."""
    path = Path(manifests or manifests_dir()) / KINETICS400_FILE.name
    try:
        return read_kinetics400_classes(path)
    except ConceptError as e:
        raise ActionDataError(str(e)) from None
