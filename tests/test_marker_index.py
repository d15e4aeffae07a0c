"""The marker index (pipeline.marker_index): one file instead of one read per shard marker, and
never a marker other than the one in ``_done/``."""

import json
import logging
import os

from pipeline.marker_index import INDEX_FILE
from pipeline.output import OutputDir
from pipeline.shards import Shard


def _write(out: OutputDir, i: int, *uris: str) -> None:
    out.write_shard(Shard(f"files-{i:05d}", "files", uris or (f"/src/{i}.jpg",)), [], [])


def _on_disk(folder) -> dict:
    """The markers as the files say, the truth the index must agree with."""
    return {p.stem: json.loads(p.read_text()) for p in (folder / "_done").glob("*.json")}


def _counting_reads(out) -> list:
    """Make ``out`` note every marker path it reads in one concurrent read (``cat_ranges``)."""
    read, cat = [], out.fs.cat_ranges

    def counting(paths, *args, **kwargs):
        read.extend(os.path.basename(p) for p in paths)
        return cat(paths, *args, **kwargs)

    out.fs.cat_ranges = counting
    return read


def _reader(folder) -> OutputDir:
    out = OutputDir(str(folder))
    out.fs = type(out.fs)(skip_instance_cache=True)  # its own, so counting its reads leaves others alone
    return out


def test_the_run_holding_the_lease_writes_the_index_and_readers_then_read_no_marker(tmp_path):
    folder = tmp_path / "out"
    out = OutputDir(str(folder))
    for i in range(5):
        _write(out, i)
    assert out.markers() == _on_disk(folder)
    assert not (folder / INDEX_FILE).exists()  # readers (stats, export) never write it

    with out.hold_lease():
        assert out.markers() == _on_disk(folder)
    assert (folder / INDEX_FILE).exists()
    reader = _reader(folder)
    read = _counting_reads(reader)
    assert reader.markers() == _on_disk(folder) and read == []
    # A few markers (a gallery's shards) are read as such rather than through the whole index.
    assert reader.markers(["files-00003", "files-00009"]) == {"files-00003": _on_disk(folder)["files-00003"]}
    assert read == ["files-00003.json"]

    written = os.stat(folder / INDEX_FILE).st_mtime_ns
    with out.hold_lease():  # current: not written again
        out.markers()
    assert os.stat(folder / INDEX_FILE).st_mtime_ns == written


def test_markers_written_rewritten_or_removed_since_the_index_are_read_as_listed(tmp_path):
    folder = tmp_path / "out"
    out = OutputDir(str(folder))
    for i in range(4):
        _write(out, i)
    with out.hold_lease():
        out.markers()
    _write(out, 1, "/src/1.jpg", "/src/1b.jpg")  # redone with another member
    _write(out, 2, "/src/x.jpg")  # the same size as before: the listing's mtime tells it apart
    out.reopen(Shard("files-00003", "files", ()))  # being redone: not complete
    _write(out, 4)  # new
    reader = _reader(folder)
    read = _counting_reads(reader)
    markers = reader.markers()
    assert markers == _on_disk(folder)
    assert markers["files-00001"]["members"] == ["/src/1.jpg", "/src/1b.jpg"] and "files-00003" not in markers
    assert sorted(read) == ["files-00001.json", "files-00002.json", "files-00004.json"]

    with out.hold_lease():  # the run's start (or end) brings it up to date
        out.markers()
    read.clear()
    assert reader.markers() == _on_disk(folder) and read == []


def test_an_index_that_cannot_be_read_is_passed_over_and_rewritten(tmp_path, caplog):
    folder = tmp_path / "out"
    out = OutputDir(str(folder))
    for i in range(3):
        _write(out, i)
    (folder / INDEX_FILE).write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING, logger="pipeline.marker_index"):
        assert OutputDir(str(folder)).markers() == _on_disk(folder)
    assert "Passing over the marker index" in caplog.text and "reading every marker instead" in caplog.text
    with out.hold_lease():
        out.markers()
    reader = _reader(folder)
    read = _counting_reads(reader)
    assert reader.markers() == _on_disk(folder) and read == []


def test_an_index_that_cannot_be_written_costs_reads_not_the_run(tmp_path, monkeypatch, caplog):
    from pipeline import marker_index

    folder = tmp_path / "out"
    out = OutputDir(str(folder))
    _write(out, 0)

    def refused(*args):
        raise PermissionError("read-only bucket")

    monkeypatch.setattr(marker_index, "write_index", refused)
    with out.hold_lease(), caplog.at_level(logging.WARNING, logger="pipeline.marker_index"):
        assert out.markers() == _on_disk(folder)
    assert "Could not write the marker index" in caplog.text


def test_overwrite_clears_the_index_with_the_markers(tmp_path):
    folder = tmp_path / "out"
    out = OutputDir(str(folder))
    _write(out, 0)
    with out.hold_lease():
        out.markers()
        out.clear()
    assert not (folder / INDEX_FILE).exists() and out.markers() == {}


def test_on_s3_an_index_saves_a_get_per_marker_and_a_new_etag_is_read_again(s3_bucket):
    opts = s3_bucket("indexbucket")
    out = OutputDir("s3://indexbucket/run", opts)
    for i in range(3):
        _write(out, i)
    with out.hold_lease():
        before = out.markers()
    _write(out, 1, "/src/x.jpg")  # the same size: another ETag
    reader = OutputDir("s3://indexbucket/run", opts)
    reader.fs = type(reader.fs)(skip_instance_cache=True, **opts)
    read = _counting_reads(reader)
    markers = reader.markers()
    assert read == ["files-00001.json"] and markers["files-00001"]["members"] == ["/src/x.jpg"]
    assert {s: m for s, m in markers.items() if s != "files-00001"} == {s: m for s, m in before.items()
                                                                          if s != "files-00001"}


def test_an_exports_markers_have_an_index_of_their_own(tmp_path):
    from pipeline.export import EXPORT_MARKERS, ExportDest

    dest = ExportDest(str(tmp_path / "sa1b"))
    for i in range(3):
        dest.write_marker(f"files-{i:05d}", {"format": "sa1b-json", "files": [f"{i}.json"]})
    truth = dest.markers()
    assert len(truth) == 3 and dest.markers(update=True) == truth  # the export holding the lease
    reader = ExportDest(str(tmp_path / "sa1b"))
    reader.fs = type(reader.fs)(skip_instance_cache=True)
    read = _counting_reads(reader)
    assert reader.markers() == truth and read == []
    dest.clear_markers()  # --overwrite
    assert list((tmp_path / "sa1b" / EXPORT_MARKERS).iterdir()) == [] and dest.markers() == {}


def test_markers_hold_one_string_per_uri(tmp_path):
    """A marker's digests are keyed by the very strings of its members, read through the index or
    not: a driver resuming 10M loose files holds every marker, and each URI twice would be ~1 GB."""
    folder = tmp_path / "out"
    out = OutputDir(str(folder))
    uris = tuple(f"/src/cam{k}/{k:04d}.jpg" for k in range(3))
    out.write_shard(Shard("files-00000", "files", uris, "/src", tuple(f"{k}:1.5" for k in range(3))), [], [])
    for readers_turn in (False, True):  # without the index (it is written), then through it
        with out.hold_lease():
            (marker,) = out.markers().values()
        assert marker == _on_disk(folder)["files-00000"] and list(marker["digests"]) == list(uris)
        assert all(key is member for key, member in zip(marker["digests"], marker["members"]))
    assert (folder / INDEX_FILE).exists()
