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
