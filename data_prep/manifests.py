"""Split manifests of the supported datasets, read into one list of entries plus a class list.

Supported files:

* WLASL `WLASL_v0.3.json`: a list of glosses, each with `instances` (video_id, url, split,
  frame_start indexed from 1, frame_end inclusive or -1 for the last frame). Class ids are
  the glosses in file order. The clips are made from start_kit's downloads
  (`raw_videos_mp4/`) exactly as start_kit's `preprocess.py` makes `videos/`: a YouTube
  instance's download is named by the YouTube id (the url's last 11 characters), is shared by
  every instance cut from that video, and is cut to the decoded frames
  [frame_start - 1, frame_end) as they are numbered in the file, whatever its frame rate (the
  whole file when frame_end <= 1); any other instance is its own download,
  `{video_id}.mp4`, used whole.
* WLASL `nslt_{100,300,1000,2000}.json`: `{video_id: {"subset": split, "action": [label,
  frame_start, frame_end]}}` with `wlasl_class_list.txt` (`index<TAB>gloss` lines). These
  split files index start_kit's per-instance clips (`videos/{video_id}.mp4`, already cut to
  the gloss), so the whole clip is used and the `action` frame numbers are not applied again.
* The published SignNet CSV splits: `relative/path.mp4 label` per line; split = file stem.
* ASL-Citizen CSV splits: `Participant ID,Video file,Gloss,ASL-LEX Code`; split = file stem;
  classes are the sorted unique glosses of `train.csv`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Sequence

DATASETS = ("wlasl", "csv", "asl_citizen")
# Text files saved by Excel or Windows Notepad start with a byte order mark; "utf-8-sig" drops
# it (and reads plain UTF-8 alike), where "utf-8" would glue it to the first name or path.
ENCODING = "utf-8-sig"
# What to do about a split file that lists no video (an empty split would be dropped silently).
SPLIT_FIX = (
    "every --split-file must list at least one video: give the right file, or leave this one out"
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One video of a split manifest.

    Attributes:
      split: split name ("train", "val", "test", ...).
      video_id: id from the manifest (unique within a split).
      path: video path relative to the videos folder.
      label: class index into the manifest's class list.
      gloss: class name.
      frame_start: first frame of the gloss in the decoded file, indexed from 1; None = start.
      frame_end: last frame of the gloss (inclusive); None = to the end.
    """

    split: str
    video_id: str
    path: str
    label: int
    gloss: str
    frame_start: int | None = None
    frame_end: int | None = None

    def source_span(self) -> tuple[int, int | None]:
        """The span as [start, end) indices of the decoded frames; end None = to the last."""
        start = 0 if self.frame_start is None else max(0, self.frame_start - 1)
        # frame_end is inclusive and 1-indexed, i.e. the exclusive 0-indexed end.
        return start, self.frame_end


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Entries of one or more splits and the class list their labels index."""

    classes: list[str]
    entries: list[Entry]

    def split_counts(self) -> dict[str, int]:
        """Number of entries per split, in first-seen order."""
        return dict(collections.Counter(e.split for e in self.entries))


# Split files and class lists are text of a few MB (WLASL_v0.3.json: 11 MB); far larger is
# another file given by mistake (a video), refused before it is read.
MAX_TEXT_BYTES = 256 << 20


def read_text(
    path: str | os.PathLike, what: str, suffixes: Sequence[str] = (), newline: str | None = None
) -> str:
    """The text of a small input file, or an error naming it (as `what`) and the fix.

    Args:
      path: the file.
      what: how messages name it, e.g. "split file" or "--class-list".
      suffixes: the usual suffixes of such files; a folder given instead is answered with the
        files in it that have one.
      newline: as for `open`: None turns every line ending into "\n"; "" keeps them (csv).

    Returns:
      The text, a leading byte order mark dropped.

    Raises:
      FileNotFoundError: nothing at `path`.
      ValueError: a folder, not a regular file (a pipe), far too large, not UTF-8 text, or
        unreadable.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            names = os.listdir(path)
        except OSError:
            names = []
        inside = sorted(
            name
            for name in names
            if name.lower().endswith(tuple(suffixes)) and os.path.isfile(os.path.join(path, name))
        )
        fix = (
            f"give one of the files in it, e.g. {os.path.join(path, inside[0])}"
            if inside
            else "give the file itself"
        )
        more = f" ({len(inside)} such files there)" if len(inside) > 1 else ""
        raise ValueError(f"{what} {path} is a folder; {fix}{more}")
    # a pipe (a shell's <(...)) has no name of its own, which the records keep of their split
    # files (an nslt file also finds its class list beside it); a device is no text file
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{what} {path} is not a regular file; save it to a file and give that")
    try:
        size = os.path.getsize(path)
        if size > MAX_TEXT_BYTES:
            raise ValueError(
                f"{what} {path} is {size / 2**20:.0f} MiB, too large for one (they are text of "
                "a few MB): give the right file"
            )
        with open(path, encoding=ENCODING, newline=newline) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_class_list(path: str | os.PathLike, what: str = "class list") -> list[str]:
    """Reads a class list: `index gloss` lines (as wlasl_class_list.txt) or one gloss a line.

    Args:
      path: text file; with indices they must run 0, 1, 2, ... in order.
      what: how errors name the file (e.g. the command-line flag that gave it).

    Returns:
      Glosses; label i is element i.
    """
    path = os.fspath(path)
    lines = read_text(path, what, (".txt",)).split("\n")
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError(f"{what} {path} is empty; give one gloss a line")
    indexed = [re.fullmatch(r"\s*(\d+)\s+(\S.*?)\s*", line) for line in lines]
    if all(indexed):
        glosses = []
        for lineno, m in enumerate(indexed):
            if int(m.group(1)) != lineno:
                raise ValueError(
                    f"{what} {path}: line {lineno + 1} has index {m.group(1)}, expected {lineno} "
                    "(indices must run 0, 1, 2, ... in order)"
                )
            glosses.append(m.group(2))
    else:
        glosses = [line.strip() for line in lines]
    dupes = [g for g, n in collections.Counter(glosses).items() if n > 1]
    if dupes:
        raise ValueError(f"{what} {path}: duplicate classes {dupes[:5]}")
    return glosses


def _read_split(path: str, newline: str | None = None) -> str:
    """A split file's text, read once; refused when blank (0 bytes, blank lines, a BOM)."""
    text = read_text(path, "split file", (".json", ".csv", ".txt"), newline)
    if not text.strip():
        raise ValueError(f"split file {path} is empty; {SPLIT_FIX}")
    return text


def _load_json(path: str) -> object:
    try:
        return json.loads(_read_split(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def load_wlasl(
    split_file: str | os.PathLike,
    class_list: str | os.PathLike | None = None,
    num_glosses: int | None = None,
) -> Manifest:
    """Reads WLASL_v0.3.json or an nslt_*.json split file.

    Args:
      split_file: `WLASL_v0.3.json` (list of glosses) or `nslt_K.json` (dict of video ids).
      class_list: for nslt files, `wlasl_class_list.txt`; defaults to the one beside the
        split file. Refused for WLASL_v0.3.json, whose gloss order defines the classes.
      num_glosses: WLASL-K from WLASL_v0.3.json: its first K glosses (all by default).

    Returns:
      The manifest; for nslt_K.json the classes are the first K of the class list.
    """
    split_file = os.fspath(split_file)
    data = _load_json(split_file)
    if isinstance(data, list):
        if class_list is not None:
            raise ValueError(
                f"{split_file}: a WLASL_v0.3.json's classes are its glosses in file order; "
                f"drop --class-list {class_list}"
            )
        if num_glosses is not None:
            if not 1 <= num_glosses <= len(data):
                raise ValueError(
                    f"--num-glosses {num_glosses}: {split_file} has {len(data)} glosses; give "
                    f"1 to {len(data)} (WLASL-K is its first K glosses)"
                )
            data = data[:num_glosses]
        return _load_wlasl_v03(split_file, data)
    if num_glosses is not None:
        raise ValueError(
            f"--num-glosses applies to WLASL_v0.3.json; {split_file} is an nslt split file, "
            "whose K glosses are set already (nslt_100.json is WLASL100): drop --num-glosses"
        )
    if isinstance(data, dict):
        return _load_nslt(split_file, data, class_list)
    raise ValueError(f"{split_file}: expected WLASL_v0.3.json (a list) or nslt_*.json (a dict)")


def _load_wlasl_v03(path: str, data: list) -> Manifest:
    classes, entries = [], []
    for label, item in enumerate(data):
        try:
            gloss = item["gloss"]
            instances = item["instances"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: gloss #{label} lacks 'gloss'/'instances'") from e
        classes.append(gloss)
        for inst in instances:
            try:
                video_id = str(inst["video_id"])
                start = int(inst["frame_start"])
                end = int(inst["frame_end"])
                youtube = _youtube_id(inst.get("url"))
                # start_kit cuts YouTube downloads only, and copies them whole when
                # frame_end - 1 <= 0 (frame_end -1: to the end)
                cut = youtube is not None and end > 1
                entries.append(
                    Entry(
                        split=inst["split"],
                        video_id=video_id,
                        path=f"{youtube or video_id}.mp4",
                        label=label,
                        gloss=gloss,
                        frame_start=start if cut else None,
                        frame_end=end if cut else None,
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(
                    f"{path}: gloss {gloss!r}: instance {inst!r:.120} lacks video_id / split / "
                    f"frame_start / frame_end ({e})"
                ) from e
    return Manifest(classes, entries)


def _youtube_id(url: str | None) -> str | None:
    """The YouTube id that names a YouTube instance's download, as start_kit takes it."""
    if url and ("youtube" in url or "youtu.be" in url):
        return url[-11:]
    return None


def _load_nslt(path: str, data: dict, class_list: str | os.PathLike | None) -> Manifest:
    if class_list is None:
        class_list = os.path.join(os.path.dirname(path), "wlasl_class_list.txt")
        if not os.path.isfile(class_list):
            raise FileNotFoundError(
                f"{path}: nslt split files need wlasl_class_list.txt; not found beside it, "
                "pass --class-list"
            )
    all_classes = load_class_list(class_list)
    entries = []
    for video_id, item in data.items():
        try:
            label = int(item["action"][0])
            split = item["subset"]
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ValueError(
                f"{path}: {video_id}: expected {{'subset', 'action': [label, ...]}}"
            ) from e
        if not 0 <= label < len(all_classes):
            raise ValueError(
                f"{path}: {video_id}: label {label} outside {class_list} "
                f"({len(all_classes)} classes)"
            )
        entries.append(Entry(split, str(video_id), f"{video_id}.mp4", label, all_classes[label]))
    m = re.fullmatch(r"nslt_(\d+)\.json", os.path.basename(path))
    k = int(m.group(1)) if m else max((e.label for e in entries), default=-1) + 1
    if k > len(all_classes) or any(e.label >= k for e in entries):
        raise ValueError(f"{path}: labels exceed the {k} classes its name implies")
    return Manifest(all_classes[:k], entries)


def _split_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def load_csv(
    split_files: Sequence[str | os.PathLike], class_list: str | os.PathLike | None
) -> Manifest:
    """Reads the published SignNet CSV splits (`relative/path.mp4 label` lines).

    Args:
      split_files: one file per split; the split name is the file stem (train.csv -> train).
      class_list: the class list the integer labels index (required: the published CSVs
        number classes alphabetically and carry no names).

    Returns:
      The manifest; video_id is the relative path as written.
    """
    if class_list is None:
        raise ValueError(
            "--dataset csv needs --class-list FILE (one gloss a line, line i = label i, or "
            "'i gloss' lines): the CSV labels are bare integers"
        )
    classes = load_class_list(class_list)
    entries = []
    for split_file in map(os.fspath, split_files):
        split = _split_name(split_file)
        for lineno, line in enumerate(_read_split(split_file).split("\n"), 1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(maxsplit=1)
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise ValueError(
                    f"{split_file}:{lineno}: expected 'relative/path.mp4 label', "
                    f"got {line.strip()[:80]!r}{'...' if len(line.strip()) > 80 else ''}"
                )
            rel, label = parts[0], int(parts[1])
            if not 0 <= label < len(classes):
                raise ValueError(
                    f"{split_file}:{lineno}: label {label} outside the class list "
                    f"{class_list} ({len(classes)} classes)"
                )
            entries.append(Entry(split, rel, rel, label, classes[label]))
    return Manifest(classes, entries)


ASL_CITIZEN_COLUMNS = ("Participant ID", "Video file", "Gloss", "ASL-LEX Code")


def _read_asl_citizen(path: str) -> list[tuple[int, str, str]]:
    text = _read_split(path, newline="")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames:  # "Video file , Gloss": spaces around names are not part of them
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
    missing = [c for c in ("Video file", "Gloss") if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; ASL-Citizen CSVs have the header "
            f"{','.join(ASL_CITIZEN_COLUMNS)}"
        )
    rows = []
    for row in reader:
        lineno = reader.line_num
        # More fields than the header (empty ones, a trailing comma, aside): a comma in
        # an unquoted value, which would otherwise shift the gloss silently.
        if any(v.strip() for v in row.get(None) or []):
            raise ValueError(
                f"{path}:{lineno}: {len(reader.fieldnames) + len(row[None])} fields, the "
                f"header has {len(reader.fieldnames)}; quote values that hold a comma "
                '(e.g. "BOOK, RED")'
            )
        video, gloss = (row["Video file"] or "").strip(), (row["Gloss"] or "").strip()
        if not video or not gloss:
            raise ValueError(f"{path}:{lineno}: empty 'Video file' or 'Gloss'")
        rows.append((lineno, video, gloss))
    if not rows:
        raise ValueError(f"split file {path} has a header but no rows; {SPLIT_FIX}")
    return rows


def load_asl_citizen(
    split_files: Sequence[str | os.PathLike], class_list: str | os.PathLike | None = None
) -> Manifest:
    """Reads ASL-Citizen split CSVs.

    Args:
      split_files: e.g. splits/train.csv, splits/val.csv, splits/test.csv; split = file stem.
      class_list: optional; by default the sorted unique glosses of the split named "train".

    Returns:
      The manifest; video_id and path are the `Video file` column.
    """
    files = [os.fspath(p) for p in split_files]
    rows = {p: _read_asl_citizen(p) for p in files}
    if class_list is not None:
        classes = load_class_list(class_list)
    else:
        train = [p for p in files if _split_name(p) == "train"]
        if not train:
            raise ValueError(
                "ASL-Citizen classes are the sorted glosses of train.csv: include it in "
                "--split-file or pass --class-list"
            )
        classes = sorted({gloss for _, _, gloss in rows[train[0]]})
    index = {g: i for i, g in enumerate(classes)}
    entries = []
    for path in files:
        split = _split_name(path)
        unknown = sorted({g for _, _, g in rows[path] if g not in index})
        if unknown:
            raise ValueError(
                f"{path}: {len(unknown)} gloss(es) not in the class list, e.g. {unknown[:5]}"
            )
        entries.extend(Entry(split, v, v, index[g], g) for _, v, g in rows[path])
    return Manifest(classes, entries)


def load_manifest(
    dataset: str,
    split_files: Sequence[str | os.PathLike],
    class_list: str | os.PathLike | None = None,
    num_glosses: int | None = None,
) -> Manifest:
    """Reads the split files of a dataset.

    Args:
      dataset: "wlasl", "csv" or "asl_citizen".
      split_files: the split file(s); for wlasl exactly one JSON.
      class_list: class list file (see the loaders).
      num_glosses: wlasl from WLASL_v0.3.json only: keep its first K glosses (WLASL-K).

    Returns:
      The manifest.
    """
    if dataset == "wlasl":
        if len(split_files) != 1:
            raise ValueError(
                "--dataset wlasl takes one --split-file (WLASL_v0.3.json or nslt_K.json)"
            )
        manifest = load_wlasl(split_files[0], class_list, num_glosses)
    elif num_glosses is not None:
        raise ValueError(
            f"--num-glosses applies to --dataset wlasl (WLASL_v0.3.json), not {dataset}"
        )
    elif dataset == "csv":
        manifest = load_csv(split_files, class_list)
    elif dataset == "asl_citizen":
        manifest = load_asl_citizen(split_files, class_list)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if not manifest.entries:  # CSVs are checked one by one as they are read; wlasl has one file
        raise ValueError(f"split file {split_files[0]} lists no videos; {SPLIT_FIX}")
    # An entry listed twice (a repeated row, a split file given twice) would become two
    # records: twice the weight in training, counted twice by the test metrics.
    repeated = [e for e, n in collections.Counter(manifest.entries).items() if n > 1]
    if repeated:
        examples = ", ".join(f"{e.split}/{e.video_id}" for e in repeated[:5])
        raise ValueError(
            f"{', '.join(map(str, split_files))}: {len(repeated)} entr"
            f"{'y is' if len(repeated) == 1 else 'ies are'} listed more than once (e.g. "
            f"{examples}); remove the repeated rows or the repeated --split-file"
        )
    return manifest
