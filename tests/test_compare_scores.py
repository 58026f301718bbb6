"""run_scripts/compare_scores.py: paired per-slice comparison across scores.csv files."""
import csv

import numpy as np
import pytest

from metrics.statistics import paired_comparison
from synthetic import load_script

FIELDS = ["sigma", "source", "slice_index", "method", "psnr_masked", "set"]


def write_scores(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def scores(offset: float, seed: int):
    """Reference 'ref' and method 'new' = ref + offset + a slice's own shift, 2 levels."""
    rng = np.random.default_rng(seed)
    rows = []
    for group, n in (("same-subject", 6), ("unseen", 3)):
        for i in range(n):
            for sigma in (0.1, 0.2):
                base = 30 - 20 * sigma + rng.normal()
                rows.append({"sigma": sigma, "source": f"v{group}", "slice_index": i, "method": "ref",
                             "psnr_masked": base, "set": group})
                rows.append({"sigma": sigma, "source": f"v{group}", "slice_index": i, "method": "new",
                             "psnr_masked": base + offset + 0.1 * i, "set": group})
    return rows


def test_the_slice_is_the_unit_and_tags_are_averaged(tmp_path, capsys):
    script = load_script("compare_scores.py")
    a = write_scores(tmp_path / "a.csv", scores(0.5, 0))
    b = write_scores(tmp_path / "b.csv", scores(1.5, 1))
    text = script.main(["--scores", f"s0={a}", f"s1={b}", "--reference", "ref", "--out", str(tmp_path / "t.md")])
    assert (tmp_path / "t.md").read_text() == text
    # averaged over the two files, the difference on slice i is 1.0 + 0.1 i, at each level
    unseen = text.split("### unseen")[1]
    row = next(line for line in unseen.splitlines() if line.startswith("| all levels | new |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    expected = paired_comparison(1.0 + 0.1 * np.arange(3), np.zeros(3))
    assert cells[2] == "3"  # 3 slices, not 3 x 2 levels x 2 files rows
    assert float(cells[5]) == pytest.approx(expected["mean_diff"], abs=0.005)
    assert cells[6] == f"[{expected['ci_low']:+.2f}, {expected['ci_high']:+.2f}]"
    assert cells[8] == "better"
    same = text.split("### same-subject")[1].split("### unseen")[0]
    assert same.count("| new |") == 3  # levels 0.1, 0.2 and all levels


def test_by_source_gives_one_table_per_volume_and_methods_split_across_files_pair(tmp_path):
    """--by-source: a table per (set, source), each pairing only that volume's slices; a
    method scored in one file pairs with a reference scored in another (same slices)."""
    script = load_script("compare_scores.py")
    rows = scores(0.5, 0)
    for r in rows[:]:  # a second unseen volume where 'new' is 2 dB worse
        if r["set"] == "unseen":
            rows.append({**r, "source": "w", "psnr_masked": r["psnr_masked"] - (2.5 if r["method"] == "new" else 0)})
    ref = write_scores(tmp_path / "ref.csv", [r for r in rows if r["method"] == "ref"])
    new = write_scores(tmp_path / "new.csv", [r for r in rows if r["method"] == "new"])
    text = script.main(["--scores", f"a={ref}", f"b={new}", "--reference", "ref", "--by-source"])
    assert "### same-subject: vsame-subject" in text and "### unseen: vunseen" in text and "### unseen: w" in text
    for title, diff in (("### unseen: vunseen", 0.6), ("### unseen: w", -1.9)):  # mean of offset + 0.1 i
        table = text.split(title)[1].split("###")[0]
        row = next(line for line in table.splitlines() if line.startswith("| all levels | new |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[2] == "3" and float(cells[5]) == pytest.approx(diff, abs=0.005)
    pooled = script.main(["--scores", f"a={ref}", f"b={new}", "--reference", "ref"])
    row = next(line for line in pooled.split("### unseen")[1].splitlines() if line.startswith("| all levels | new |"))
    assert row.split("|")[3].strip() == "6"  # both unseen volumes pooled: 6 slices


def test_refusals(tmp_path):
    script = load_script("compare_scores.py")
    a = write_scores(tmp_path / "a.csv", scores(0.5, 0))
    with pytest.raises(SystemExit, match="method 'nope' is not in the scores"):
        script.main(["--scores", str(a), "--reference", "nope"])
    with pytest.raises(SystemExit, match="scores file not found"):
        script.main(["--scores", str(tmp_path / "missing.csv"), "--reference", "ref"])
    (tmp_path / "bad.csv").write_text("method,psnr_masked\nref,30\n")
    with pytest.raises(SystemExit, match=r"bad.csv lacks the column\(s\) \['set', 'sigma', 'slice_index', 'source'\]"):
        script.main(["--scores", str(tmp_path / "bad.csv"), "--reference", "ref"])
    with pytest.raises(SystemExit, match="unknown score 'psnrr'"):
        script.main(["--scores", str(a), "--reference", "ref", "--score", "psnrr"])


def refused(script, argv, capsys) -> str:
    """The one stderr line of a refusal (exit status 2)."""
    with pytest.raises(SystemExit) as info:
        script.main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compare_scores.py: "), lines
    return lines[0]


def test_an_infinite_score_is_refused_with_its_rows(tmp_path, capsys):
    """PSNR inf (a prediction identical to the clean slice) used to drop the slice silently."""
    script = load_script("compare_scores.py")
    rows = scores(0.5, 0)
    rows[3]["psnr_masked"] = float("inf")  # 'new' on same-subject slice 0 at sigma 0.2 (file line 5)
    path = write_scores(tmp_path / "a.csv", rows)
    line = refused(script, ["--scores", str(path), "--reference", "ref"], capsys)
    assert "1 row(s) with an infinite psnr_masked" in line
    assert f"{path}:5 (new, vsame-subject slice 0, sigma 0.2)" in line
    # the row of a method left out of the comparison does not matter
    assert "| 0.1 | ref | 6 |" in script.main(["--scores", str(path), "--reference", "ref", "--methods", "ref"])


def test_duplicated_rows_are_refused_naming_both_lines(tmp_path, capsys):
    script = load_script("compare_scores.py")
    rows = scores(0.5, 0)
    path = write_scores(tmp_path / "a.csv", rows + [dict(rows[1], psnr_masked=99.0)])
    line = refused(script, ["--scores", str(path), "--reference", "ref"], capsys)
    last = len(rows) + 2
    assert "1 duplicated row(s)" in line and f"{path}:3 = {path}:{last} (new, vsame-subject slice 0, sigma 0.1)" in line
    # two files under one tag, or one file twice
    b, c = write_scores(tmp_path / "b.csv", rows), write_scores(tmp_path / "c.csv", rows)
    line = refused(script, ["--scores", f"s={b}", f"s={c}", "--reference", "ref"], capsys)
    assert f"{len(rows)} duplicated row(s)" in line and f"{b}:2 = {c}:2 (ref, vsame-subject slice 0, sigma 0.1)" in line
    assert f"{b} is given twice" in refused(script, ["--scores", f"s0={b}", f"s1={b}", "--reference", "ref"], capsys)


def test_a_row_without_sigma_is_refused_naming_it(tmp_path, capsys):
    script = load_script("compare_scores.py")
    for bad in ("", "nan"):
        rows = scores(0.5, 0)
        rows[2]["sigma"] = bad
        path = write_scores(tmp_path / "a.csv", rows)
        line = refused(script, ["--scores", str(path), "--reference", "ref"], capsys)
        assert f"1 row(s) without a numeric sigma or slice_index: {path}:4 (ref, vsame-subject)" in line


def test_other_refusals_exit_2_and_nan_scores_are_counted(tmp_path, capsys):
    script = load_script("compare_scores.py")
    rows = scores(0.5, 0)
    path = write_scores(tmp_path / "a.csv", rows)
    assert "--score: unknown score 'psnrr'" in refused(script, ["--scores", str(path), "--reference", "ref",
                                                                "--score", "psnrr"], capsys)
    assert "lacks the column(s) ['ssim']" in refused(script, ["--scores", str(path), "--reference", "ref",
                                                             "--score", "ssim"], capsys)
    (tmp_path / "file").write_text("")
    assert "--out " in refused(script, ["--scores", str(path), "--reference", "ref",
                                        "--out", str(tmp_path / "file" / "t.md")], capsys)
    rows[1]["psnr_masked"] = ""  # not defined for that row: the slice is left out, and the table says so
    text = script.main(["--scores", str(write_scores(tmp_path / "n.csv", rows)), "--reference", "ref"])
    same = text.split("### same-subject")[1].split("### unseen")[0]
    assert "1 slice(s) left out where a compared method has no psnr_masked" in same
    assert "| 0.1 | new | 5 |" in same and "| 0.2 | new | 6 |" in same
