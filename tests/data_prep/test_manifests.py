"""Tests for data_prep.manifests on the real WLASL split files and small hand-written ones."""

import collections
import json
import os

import pytest

from data_prep import manifests


@pytest.fixture(scope="module")
def wlasl_dir(shared_dir):
    return shared_dir / "datasets" / "wlasl"


def test_real_nslt_2000(wlasl_dir):
    m = manifests.load_manifest("wlasl", [wlasl_dir / "nslt_2000.json"])
    assert len(m.entries) == 21_095
    assert m.split_counts() == {"train": 14_296, "val": 3_920, "test": 2_879}
    assert len(m.classes) == 2000
    assert m.classes[:3] == ["book", "drink", "computer"]
    assert all(0 <= e.label < 2000 and m.classes[e.label] == e.gloss for e in m.entries)
    # every class has training and (in nslt_2000, unlike v0.3's 'caterpillar') test videos
    assert {e.label for e in m.entries if e.split == "train"} == set(range(2000))
    assert {e.label for e in m.entries if e.split == "test"} == set(range(2000))
    by_id = {e.video_id: e for e in m.entries}
    e = by_id["05237"]
    assert (e.split, e.label, e.gloss, e.path) == ("train", 77, "basketball", "05237.mp4")
    # nslt files index start_kit's already-cut clips: the whole file is used
    assert e.source_span() == (0, None)


@pytest.mark.parametrize("k", [100, 300, 1000])
def test_real_nslt_subsets_are_first_k_classes(wlasl_dir, k):
    full = manifests.load_wlasl(wlasl_dir / "nslt_2000.json")
    m = manifests.load_wlasl(wlasl_dir / f"nslt_{k}.json")
    assert m.classes == full.classes[:k]
    assert max(e.label for e in m.entries) == k - 1
    full_by_id = {e.video_id: e for e in full.entries}
    assert all(full_by_id[e.video_id] == e for e in m.entries)


def test_real_nslt_100_counts(wlasl_dir):
    m = manifests.load_wlasl(wlasl_dir / "nslt_100.json")
    assert m.split_counts() == {"train": 1442, "val": 338, "test": 258}


def test_nslt_needs_class_list(tmp_path, wlasl_dir):
    split = tmp_path / "nslt_100.json"
    split.write_text((wlasl_dir / "nslt_100.json").read_text())
    with pytest.raises(FileNotFoundError, match="wlasl_class_list.txt.*--class-list"):
        manifests.load_wlasl(split)
    m = manifests.load_wlasl(split, class_list=wlasl_dir / "wlasl_class_list.txt")
    assert len(m.classes) == 100


def test_nslt_label_out_of_range(tmp_path):
    (tmp_path / "classes.txt").write_text("0\ta\n1\tb\n")
    split = tmp_path / "nslt_2.json"
    split.write_text(json.dumps({"00001": {"subset": "train", "action": [2, 1, 10]}}))
    with pytest.raises(ValueError, match="00001: label 2 outside"):
        manifests.load_wlasl(split, tmp_path / "classes.txt")


def _v03():
    yt = {"frame_start": 7685, "frame_end": 7832, "fps": 25}
    return [
        {
            "gloss": "book",
            "instances": [
                {
                    "video_id": "69241",
                    "split": "train",
                    "frame_start": 1,
                    "frame_end": -1,
                    "fps": 25,
                },
                {
                    "video_id": "65225",
                    "split": "test",
                    "frame_start": 26,
                    "frame_end": 75,
                    "fps": 25,
                },
            ],
        },
        {
            "gloss": "drink",
            "instances": [
                {"video_id": "69302", "split": "val", "frame_start": 11, "frame_end": 60, "fps": 25}
            ],
        },
        {
            "gloss": "all",
            "instances": [  # two glosses cut from one YouTube video, and a site's own file
                {**yt, "video_id": vid, "url": url, "split": "train"}
                for vid, url in [
                    ("01610", "https://www.youtube.com/watch?v=F5J1dMXxMGY"),
                    ("01611", "https://youtu.be/F5J1dMXxMGY"),
                    ("01612", "https://www.signingsavvy.com/signs/mp4/5/5228.mp4"),
                ]
            ],
        },
    ]


def test_wlasl_v03_spans_and_classes(tmp_path):
    path = tmp_path / "WLASL_v0.3.json"
    path.write_text(json.dumps(_v03()))
    m = manifests.load_manifest("wlasl", [path])
    assert m.classes == ["book", "drink", "all"]
    assert [(e.split, e.video_id, e.label, e.gloss, e.path) for e in m.entries] == [
        ("train", "69241", 0, "book", "69241.mp4"),
        ("test", "65225", 0, "book", "65225.mp4"),
        ("val", "69302", 1, "drink", "69302.mp4"),
        # YouTube instances: the uncut download is named by the YouTube id
        ("train", "01610", 2, "all", "F5J1dMXxMGY.mp4"),
        ("train", "01611", 2, "all", "F5J1dMXxMGY.mp4"),
        ("train", "01612", 2, "all", "01612.mp4"),
    ]
    # as start_kit's preprocess.py: only YouTube downloads are cut, to the decoded frames
    # [frame_start - 1, frame_end) whatever the file's frame rate
    assert [e.source_span() for e in m.entries] == [
        (0, None), (0, None), (0, None),  # not YouTube: the instance's own file, whole
        (7684, 7832), (7684, 7832),
        (0, None),
    ]  # fmt: skip


def test_wlasl_k_is_the_first_k_glosses_of_v03(tmp_path):
    path = tmp_path / "WLASL_v0.3.json"
    path.write_text(json.dumps(_v03()))
    m = manifests.load_manifest("wlasl", [path], num_glosses=2)
    assert m.classes == ["book", "drink"]
    assert [(e.split, e.video_id, e.label) for e in m.entries] == [
        ("train", "69241", 0), ("test", "65225", 0), ("val", "69302", 1)
    ]  # fmt: skip
    assert manifests.load_manifest("wlasl", [path], num_glosses=3).classes == m.classes + ["all"]
    for k in (0, 4):
        with pytest.raises(ValueError) as e:
            manifests.load_manifest("wlasl", [path], num_glosses=k)
        assert str(e.value) == (
            f"--num-glosses {k}: {path} has 3 glosses; give 1 to 3 (WLASL-K is its first K glosses)"
        )
    # nslt_K.json files are WLASL-K already; the CSV formats have no gloss order to cut
    nslt = tmp_path / "nslt_1.json"
    nslt.write_text(json.dumps({"69241": {"subset": "train", "action": [0, 1, 10]}}))
    (tmp_path / "wlasl_class_list.txt").write_text("0\tbook\n")
    with pytest.raises(ValueError) as e:
        manifests.load_manifest("wlasl", [nslt], num_glosses=1)
    assert str(e.value) == (
        f"--num-glosses applies to WLASL_v0.3.json; {nslt} is an nslt split file, whose K "
        "glosses are set already (nslt_100.json is WLASL100): drop --num-glosses"
    )
    (tmp_path / "train.csv").write_text("a.mp4 0\n")
    with pytest.raises(ValueError) as e:
        manifests.load_manifest("csv", [tmp_path / "train.csv"], nslt, num_glosses=1)
    assert str(e.value) == "--num-glosses applies to --dataset wlasl (WLASL_v0.3.json), not csv"


def test_wlasl_v03_youtube_spans_to_the_end_use_the_whole_file(tmp_path):
    url = "https://www.youtube.com/watch?v=F5J1dMXxMGY"
    data = [
        {
            "gloss": "all",
            "instances": [
                {"video_id": vid, "url": url, "split": "train", "frame_start": s, "frame_end": e}
                for vid, s, e in [("1", 1, -1), ("2", 5, 1), ("3", 5, 2), ("4", 1, 10)]
            ],
        }
    ]
    path = tmp_path / "WLASL_v0.3.json"
    path.write_text(json.dumps(data))
    m = manifests.load_manifest("wlasl", [path])
    # start_kit copies the download when frame_end - 1 <= 0; else it slices [start - 1, end)
    assert [e.source_span() for e in m.entries] == [(0, None), (0, None), (4, 2), (0, 10)]


def test_wlasl_v03_refuses_a_class_list(tmp_path):
    path = tmp_path / "WLASL_v0.3.json"
    path.write_text(json.dumps(_v03()))
    (tmp_path / "classes.txt").write_text("all\nbook\ndrink\n")
    with pytest.raises(
        ValueError, match="classes are its glosses in file order; drop --class-list"
    ):
        manifests.load_manifest("wlasl", [path], tmp_path / "classes.txt")


def test_wlasl_v03_bad_instance_named(tmp_path):
    data = _v03()
    del data[1]["instances"][0]["split"]
    path = tmp_path / "WLASL_v0.3.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="gloss 'drink'.*69302"):
        manifests.load_wlasl(path)


def test_class_list_formats(tmp_path):
    indexed = tmp_path / "a.txt"
    indexed.write_text("0\tthank you\n1 book\n\n")
    assert manifests.load_class_list(indexed) == ["thank you", "book"]
    plain = tmp_path / "b.txt"
    plain.write_text("apple\nbanana split\n")
    assert manifests.load_class_list(plain) == ["apple", "banana split"]
    bad = tmp_path / "c.txt"
    bad.write_text("0 a\n2 b\n")
    with pytest.raises(ValueError, match="c.txt: line 2 has index 2, expected 1"):
        manifests.load_class_list(bad)
    dup = tmp_path / "d.txt"
    dup.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="duplicate classes \\['a'\\]"):
        manifests.load_class_list(dup)


def test_signnet_csv(tmp_path):
    (tmp_path / "classes.txt").write_text("apple\nbook\ncat\n")
    (tmp_path / "train.csv").write_text("WLASL/00001.mp4 2\nWLASL/00002.mp4 0\n\n")
    (tmp_path / "val.csv").write_text("dir with space/00003.mp4 1\n")
    m = manifests.load_manifest(
        "csv", [tmp_path / "train.csv", tmp_path / "val.csv"], tmp_path / "classes.txt"
    )
    assert m.classes == ["apple", "book", "cat"]
    assert [(e.split, e.video_id, e.path, e.label, e.gloss) for e in m.entries] == [
        ("train", "WLASL/00001.mp4", "WLASL/00001.mp4", 2, "cat"),
        ("train", "WLASL/00002.mp4", "WLASL/00002.mp4", 0, "apple"),
        ("val", "dir with space/00003.mp4", "dir with space/00003.mp4", 1, "book"),
    ]
    assert m.entries[0].source_span() == (0, None)


def test_signnet_csv_errors(tmp_path):
    (tmp_path / "classes.txt").write_text("apple\nbook\n")
    (tmp_path / "train.csv").write_text("a.mp4 0\nb.mp4 7\n")
    with pytest.raises(ValueError, match="needs --class-list"):
        manifests.load_manifest("csv", [tmp_path / "train.csv"])
    with pytest.raises(ValueError, match=r"train.csv:2: label 7 outside"):
        manifests.load_manifest("csv", [tmp_path / "train.csv"], tmp_path / "classes.txt")
    (tmp_path / "test.csv").write_text("a.mp4,0\n")
    with pytest.raises(ValueError, match=r"test.csv:1: expected 'relative/path.mp4 label'"):
        manifests.load_manifest("csv", [tmp_path / "test.csv"], tmp_path / "classes.txt")
    with pytest.raises(FileNotFoundError, match="split file .*nope.csv not found"):
        manifests.load_manifest("csv", [tmp_path / "nope.csv"], tmp_path / "classes.txt")
    # a JSON split file given as CSV: one huge line, quoted only in part
    (tmp_path / "nslt.csv").write_text('{"05237": {"subset": "train"}' + ", 0" * 10_000 + "}\n")
    with pytest.raises(ValueError) as e:
        manifests.load_manifest("csv", [tmp_path / "nslt.csv"], tmp_path / "classes.txt")
    assert len(str(e.value)) < 250 and str(e.value).endswith("...")


HEADER = "Participant ID,Video file,Gloss,ASL-LEX Code\n"


def test_asl_citizen(tmp_path):
    (tmp_path / "train.csv").write_text(
        HEADER
        + "P1,111-ZEBRA.mp4,ZEBRA,A_01\nP2,112-APPLE.mp4,APPLE,B_02\nP1,113-ZEBRA.mp4,ZEBRA,A_01\n"
    )
    (tmp_path / "test.csv").write_text(HEADER + 'P3,"114-APPLE, 2.mp4",APPLE,B_02\n')
    m = manifests.load_manifest("asl_citizen", [tmp_path / "test.csv", tmp_path / "train.csv"])
    assert m.classes == ["APPLE", "ZEBRA"]
    assert [(e.split, e.video_id, e.label, e.gloss) for e in m.entries] == [
        ("test", "114-APPLE, 2.mp4", 0, "APPLE"),
        ("train", "111-ZEBRA.mp4", 1, "ZEBRA"),
        ("train", "112-APPLE.mp4", 0, "APPLE"),
        ("train", "113-ZEBRA.mp4", 1, "ZEBRA"),
    ]
    assert collections.Counter(m.split_counts()) == {"train": 3, "test": 1}


def test_asl_citizen_errors(tmp_path):
    (tmp_path / "test.csv").write_text(HEADER + "P3,114-KIWI.mp4,KIWI,B_02\n")
    with pytest.raises(ValueError, match="sorted glosses of train.csv"):
        manifests.load_manifest("asl_citizen", [tmp_path / "test.csv"])
    (tmp_path / "train.csv").write_text(HEADER + "P1,111-ZEBRA.mp4,ZEBRA,A_01\n")
    with pytest.raises(ValueError, match=r"test.csv: 1 gloss\(es\) not in the class list.*KIWI"):
        manifests.load_manifest("asl_citizen", [tmp_path / "train.csv", tmp_path / "test.csv"])
    (tmp_path / "val.csv").write_text("id,file,label\n1,a.mp4,X\n")
    with pytest.raises(
        ValueError, match=r"val.csv: missing column\(s\).*Participant ID,Video file"
    ):
        manifests.load_manifest("asl_citizen", [tmp_path / "train.csv", tmp_path / "val.csv"])


BOM = "\ufeff"  # what Excel's "CSV UTF-8" and Windows Notepad put before the first line


def test_byte_order_mark_is_not_part_of_the_first_name_or_path(tmp_path):
    (tmp_path / "indexed.txt").write_text(BOM + "0\tapple\r\n1\tbook\r\n", encoding="utf-8")
    assert manifests.load_class_list(tmp_path / "indexed.txt") == ["apple", "book"]
    (tmp_path / "plain.txt").write_text(BOM + "apple\nbook\n", encoding="utf-8")
    assert manifests.load_class_list(tmp_path / "plain.txt") == ["apple", "book"]
    (tmp_path / "train.csv").write_text(BOM + "a.mp4 1\r\nb.mp4 0\r\n", encoding="utf-8")
    m = manifests.load_manifest("csv", [tmp_path / "train.csv"], tmp_path / "plain.txt")
    assert [(e.path, e.gloss) for e in m.entries] == [("a.mp4", "book"), ("b.mp4", "apple")]
    (tmp_path / "nslt_2.json").write_text(
        BOM + json.dumps({"00001": {"subset": "train", "action": [1, 1, 10]}}), encoding="utf-8"
    )
    m = manifests.load_wlasl(tmp_path / "nslt_2.json", tmp_path / "indexed.txt")
    assert [(e.video_id, e.gloss) for e in m.entries] == [("00001", "book")]


def test_asl_citizen_header_quirks_and_rows_with_extra_fields(tmp_path):
    header = BOM + "Participant ID, Video file , Gloss,ASL-LEX Code\r\n"
    (tmp_path / "train.csv").write_text(
        header + 'P1,a.mp4,"BOOK, RED",A_01\r\nP2,b.mp4,APPLE,B_02\r\n', encoding="utf-8"
    )
    m = manifests.load_manifest("asl_citizen", [tmp_path / "train.csv"])
    assert m.classes == ["APPLE", "BOOK, RED"]
    # an unquoted comma splits the gloss: an error, not a class named 'BOOK'
    (tmp_path / "train.csv").write_text(header + "P1,a.mp4,BOOK, RED,A_01\r\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train.csv:2: 5 fields, the header has 4; quote"):
        manifests.load_manifest("asl_citizen", [tmp_path / "train.csv"])
    # trailing commas (empty extra fields) are harmless
    (tmp_path / "train.csv").write_text(header + "P1,a.mp4,BOOK,A_01,,\r\n", encoding="utf-8")
    assert manifests.load_manifest("asl_citizen", [tmp_path / "train.csv"]).classes == ["BOOK"]


def test_an_entry_listed_twice_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text(
        HEADER + "P1,111-ZEBRA.mp4,ZEBRA,A_01\nP2,112-APPLE.mp4,APPLE,B_02\n"
    )
    with pytest.raises(ValueError, match=r"2 entries are listed more than once.*train/111-ZEBRA"):
        manifests.load_manifest("asl_citizen", [tmp_path / "train.csv", tmp_path / "train.csv"])
    (tmp_path / "val.csv").write_text(HEADER + "P1,1.mp4,ZEBRA,A_01\nP1,1.mp4,ZEBRA,A_01\n")
    with pytest.raises(ValueError, match=r"1 entry is listed more than once \(e.g. val/1.mp4\)"):
        manifests.load_manifest("asl_citizen", [tmp_path / "train.csv", tmp_path / "val.csv"])
    # the same video in two splits is two entries (WLASL has such clips), not an error
    (tmp_path / "test.csv").write_text(HEADER + "P1,111-ZEBRA.mp4,ZEBRA,A_01\n")
    m = manifests.load_manifest("asl_citizen", [tmp_path / "train.csv", tmp_path / "test.csv"])
    assert m.split_counts() == {"train": 2, "test": 1}


FIX = "every --split-file must list at least one video: give the right file, or leave this one out"


def test_a_split_file_without_entries_is_named_not_dropped(tmp_path):
    (tmp_path / "classes.txt").write_text("apple\nbook\n")
    (tmp_path / "train.csv").write_text("a.mp4 0\nb.mp4 1\n")
    for content in ("", "\n  \n", BOM):  # 0 bytes, blank lines, a byte order mark only
        (tmp_path / "test.csv").write_text(content, encoding="utf-8")
        with pytest.raises(ValueError) as e:
            manifests.load_manifest(
                "csv", [tmp_path / "train.csv", tmp_path / "test.csv"], tmp_path / "classes.txt"
            )
        assert str(e.value) == f"split file {tmp_path / 'test.csv'} is empty; {FIX}"
    # ASL-Citizen: an empty file is empty (not a file 'missing columns'), a header alone no rows
    (tmp_path / "train.csv").write_text(HEADER + "P1,a.mp4,ZEBRA,A_01\n")
    (tmp_path / "val.csv").write_text("")
    with pytest.raises(ValueError) as e:
        manifests.load_manifest("asl_citizen", [tmp_path / "train.csv", tmp_path / "val.csv"])
    assert str(e.value) == f"split file {tmp_path / 'val.csv'} is empty; {FIX}"
    (tmp_path / "val.csv").write_text(HEADER)
    with pytest.raises(ValueError) as e:
        manifests.load_manifest("asl_citizen", [tmp_path / "train.csv", tmp_path / "val.csv"])
    assert str(e.value) == f"split file {tmp_path / 'val.csv'} has a header but no rows; {FIX}"
    # WLASL: one file, empty or listing no video
    for name, content in (("WLASL_v0.3.json", ""), ("WLASL_v0.3.json", "[]")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError) as e:
            manifests.load_manifest("wlasl", [tmp_path / name])
        what = "is empty" if not content else "lists no videos"
        assert str(e.value) == f"split file {tmp_path / name} {what}; {FIX}"


def test_split_files_line_endings_and_files_that_are_not_split_files(tmp_path, monkeypatch):
    (tmp_path / "classes.txt").write_bytes(b"apple\r\nbook\rcar\n")  # Windows, old Mac, Unix
    # a line ends at \n, \r\n or \r only: a path may hold other separators (\u2028, \f)
    (tmp_path / "train.csv").write_text("we\u2028ird.mp4 0\r\nform\ffeed.mp4 2\n", newline="")
    m = manifests.load_manifest("csv", [tmp_path / "train.csv"], tmp_path / "classes.txt")
    assert [(e.path, e.label, e.gloss) for e in m.entries] == [
        ("we\u2028ird.mp4", 0, "apple"),
        ("form\ffeed.mp4", 2, "car"),
    ]
    # a pipe (a shell's <(...)) has no name for the records to keep: refused before it is
    # opened (which would wait for a writer), as is a device
    os.mkfifo(tmp_path / "pipe.csv")
    for given in (tmp_path / "pipe.csv", "/dev/zero"):
        with pytest.raises(ValueError) as e:
            manifests.load_manifest("csv", [given], tmp_path / "classes.txt")
        assert str(e.value) == (
            f"split file {given} is not a regular file; save it to a file and give that"
        )
    # each split file is read once (its blank check used to read it a second time)
    opened = []

    def counted_open(file, *args, **kwargs):
        opened.append(os.fspath(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(manifests, "open", counted_open, raising=False)
    manifests.load_manifest("csv", [tmp_path / "train.csv"], tmp_path / "classes.txt")
    assert sorted(opened) == [str(tmp_path / "classes.txt"), str(tmp_path / "train.csv")]
    monkeypatch.undo()
    # a video given by mistake is refused by its size, not read into memory
    monkeypatch.setattr(manifests, "MAX_TEXT_BYTES", 1 << 20)
    (tmp_path / "clip.mp4").write_bytes(b"\0" * (3 << 20))
    with pytest.raises(ValueError) as e:
        manifests.load_manifest("csv", [tmp_path / "clip.mp4"], tmp_path / "classes.txt")
    assert str(e.value) == (
        f"split file {tmp_path / 'clip.mp4'} is 3 MiB, too large for one (they are text of a few "
        "MB): give the right file"
    )
