"""The performance harness runs on CPU and writes the figures it prints (a smoke test, not a timing)."""

from __future__ import annotations

import json
import re

import pytest

from bench import harness
from sam_core.precision import native_bf16


def test_harness_writes_every_section(tmp_path, capsys):
    out = tmp_path / "h.json"
    harness.main(["--device", "cpu", "--sections", "encoder,decoder,light,sa1b,filter,rle,postprocess,resize",
                  "--size", "120x180", "--decoder-prompts", "4", "--batches", "1,2",
                  "--points-per-side", "4", "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    enc = report["encoder"][0]
    assert enc["model_type"] == "tiny" and enc["fp32_batch1_ratio"] > 0
    names = {r["name"] for r in enc["rows"]}
    assert {"official fp32 batch 1", "official bf16 autocast batch 2", "ours fp32 batch 1 (sdpa)",
            "ours bf16 batch 2 (folded)"} <= names and report["profile"]["batches"] == [1, 2]
    decoder = report["decoder"]
    assert decoder["prompts"] == 4
    for dtype, rounding in (("fp32", 1e-4), ("bf16", 0.2)):
        rows = decoder[dtype]
        assert set(rows) == {"official", "ours_dense", "ours_factored"}
        for name in ("ours_dense", "ours_factored"):
            assert rows[name]["speedup"] > 0
            assert rows[name]["deviation"] < rounding and rows[name]["image_tokens_deviation"] < rounding
        heads = decoder["mask_head"][dtype]
        assert set(heads) == {"official", "ours_dense", "ours_factored"}
        assert heads["ours_dense"]["deviation"] == 0 if dtype == "fp32" else heads["ours_dense"]["speedup"] > 0
        assert heads["ours_factored"]["speedup"] > 0 and heads["ours_factored"]["sign_flips"] < 0.05
    light, sa1b = report["amg"]
    assert light["name"] == "light tiny" and light["official"]["s_img"] > 0
    for mode in ("exact", "fast"):
        assert light[f"ours_{mode}"]["speedup"] > 0 and "fidelity" in light[f"ours_{mode}"]
    # Fast mode names the dtype it ran in: bf16 where this CPU has it, fp32 where bf16 is emulated.
    assert light["ours_fast"]["autocast"] == light["ours_fast_batch"]["autocast"] == \
        ("bfloat16" if native_bf16("cpu") else "none")
    # With crop layers and nothing surviving the official generator raises; the harness times it
    # to the exception and still measures ours.
    assert "error" in sa1b["official"] and sa1b["official"]["s_img_until_error"] > 0
    assert sa1b["ours_fast"]["masks"] == 0
    filt = report["filter"]
    assert filt["image"] == [120, 180] and filt["official_ms_per_mask"] > 0
    assert filt["ours_eager"]["identical"] and filt["ours_compiled"]["identical"] and filt["upsample_identical"]
    rle = report["rle"]
    assert rle["image"] == [120, 180] and rle["crops"] == 21 and rle["masks"] == 105 and rle["identical"]
    post = report["postprocess"]
    assert post["image"] == [120, 180] and post["identical"] and post["changed"] > 0
    assert post["official_s_img"] > 0 and post["ours_s_img"] > 0
    resize = report["resize"]
    assert resize["image"] == [120, 180] and resize["crops"] == 21 and resize["identical"]
    assert resize["official_s_img"] > 0 and resize["ours_s_img"] > 0 and resize["generate_s_img"] > 0
    assert 0 < resize["resize_wait_s_img"] < resize["generate_s_img"]  # the first batch is waited for
    assert "== summary (cpu" in capsys.readouterr().out


def test_harness_keeps_finished_sections_when_cut_short(tmp_path, monkeypatch):
    """The JSON is written after each section: a run that dies later (a time limit, here an
    error) still leaves the figures it measured."""
    out = tmp_path / "h.json"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "bench_postprocess", killed)
    with pytest.raises(KeyboardInterrupt):
        harness.main(["--device", "cpu", "--sections", "filter,postprocess", "--size", "60x90",
                      "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["filter"]["ours_eager"]["identical"] and "postprocess" not in report


def test_harness_fast_dtype_pins_fast_modes_autocast(tmp_path, monkeypatch):
    """``--fast-dtype float32`` holds even where "auto" would pick bf16 (a native-bf16 device, faked)."""
    from sam_core import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    out = tmp_path / "h.json"
    harness.main(["--device", "cpu", "--sections", "light", "--size", "60x90", "--points-per-side", "2",
                  "--repeats", "1", "--fast-dtype", "float32", "--json", str(out)])
    light = json.loads(out.read_text())["amg"][0]
    assert light["ours_fast"]["autocast"] == light["ours_fast_batch"]["autocast"] == "none"
    assert light["ours_exact"]["autocast"] == "none"


def test_pipeline_benchmark_runs_and_prints_its_ratio(capsys):
    """``python -m bench.pipeline`` (the README's command) on 4 images: it checks that the Ray
    pipeline wrote as many masks as the engine loop found, and prints both rates and the ratio."""
    from bench import pipeline as bench_pipeline

    bench_pipeline.main(["--images", "4", "--points-per-side", "8"])
    out = capsys.readouterr().out
    assert "images ok: 4, errors: 0" in out
    assert re.search(r"engine +[0-9.]+ images/s", out) and re.search(r"pipeline / engine = [0-9.]+%", out)


def test_markers_benchmark_reads_every_marker_without_the_index_and_none_with_it(tmp_path, capsys):
    """``python -m bench.markers`` (the README's command) on 5 shards of a local moto S3 server."""
    from bench import markers as bench_markers

    bench_markers.main(["--shards", "5", "--files-per-shard", "2", "--json", str(tmp_path / "m.json")])
    result = json.loads((tmp_path / "m.json").read_text())
    assert [(result[k]["markers"], result[k]["fetched"]) for k in ("no_index", "writing_index", "with_index")] == [
        (5, 5), (5, 5), (5, 0)]
    assert re.search(r"with the index [0-9.]+x faster", capsys.readouterr().out)


def test_listing_benchmark_lists_every_file_both_ways_and_removes_them(tmp_path, capsys):
    """``python -m bench.listing`` (the README's command) on 30 files of a moto S3 server in a
    process of its own and of a local folder: one LIST request each way on S3 (the placeholders
    it writes are not counted as files), the files removed after, a prefix holding files refused."""
    from bench import listing as bench_listing

    bench_listing.main(["--files", "30", "--folders", "3", "--json", str(tmp_path / "l.json")])
    s3, local = json.loads((tmp_path / "l.json").read_text())
    assert s3["input"] == "s3://bench/listing" and (s3["fsspec_find"]["requests"], s3["list_input"]["requests"]) == (1, 1)
    assert (local["fsspec_find"]["requests"], local["list_input"]["requests"]) == (0, 0)
    assert all(r[k]["peak_bytes"] >= r[k]["held_bytes"] > 0 for r in (s3, local)
               for k in ("fsspec_find", "list_input"))
    assert len(re.findall(r"peak of find / peak of list_input: [0-9.]+", capsys.readouterr().out)) == 2
    folder = tmp_path / "in"
    bench_listing.main(["--input", str(folder), "--files", "4", "--folders", "2"])
    assert not folder.exists()
    folder.mkdir()
    (folder / "kept.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit, match="already holds files"):
        bench_listing.main(["--input", str(folder), "--files", "4"])
    assert (folder / "kept.jpg").exists()


def test_reading_benchmark_reads_every_image_both_ways_with_the_requests_each_makes(tmp_path, capsys):
    """``python -m bench.reading`` (the README's command) on 4 images of a moto S3 server in a
    process of its own, as it answers and slowed: loose files, the reader before made a HEAD and
    a GET per image, the decode stage's makes one GET; the tar (2.3 MB, one range) is read with
    its size and one GET; the files are removed after."""
    import boto3

    from bench import reading as bench_reading
    from bench.stores import moto_bucket

    bench_reading.main(["--images", "4", "--latency-ms", "20", "--mb-per-s", "200", "--json", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
    assert [(r["added_latency_ms"], r["mb_per_s_per_connection"]) for r in results] == [(0.0, 0.0), (20.0, 200.0)]
    for r in results:
        files, tar = r["loose_files"], r["tar"]
        assert files["one_at_a_time"]["requests_per_image"] == {"get_object": 1.0, "head_object": 1.0}
        assert files["decode_rows"]["requests_per_image"] == {"get_object": 1.0}
        assert tar["decode_rows"]["requests_per_image"] == {"get_object": 0.25, "head_object": 0.25}
        assert tar["one_stream"]["seconds"] > 0 and files["ratio"] > 0 and tar["ratio"] > 0
    out = capsys.readouterr().out
    assert len(re.findall(r"decode_rows / one_at_a_time: [0-9.]+", out)) == len(
        re.findall(r"decode_rows / one_stream: [0-9.]+", out)) == 2
    with moto_bucket(0.01) as opts:  # a prefix that holds files is refused, and they are kept
        client = boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
        client.put_object(Bucket="bench", Key="mine/kept.jpg", Body=b"x")
        with pytest.raises(SystemExit, match="already holds files"):
            bench_reading.run("s3://bench/mine", opts, 2, 10.0, 0.0)
        assert client.get_object(Bucket="bench", Key="mine/kept.jpg")["Body"].read() == b"x"
