"""The one plot_vs_level: a method keeps its colour in every panel, and the legend lists
every method, also one that only some groups have (BM4D runs on the unseen volumes only)."""
from pathlib import Path

from evaluation import reporting


def test_colours_follow_the_method_and_the_legend_lists_every_method(monkeypatch, tmp_path):
    shown = {}

    def keep(path, fig):
        shown["fig"] = fig
        return Path(path)

    monkeypatch.setattr(reporting, "save_figure", keep)
    curves = {"same-subject CT": {"NLM": {0.1: {"psnr": 30.0}}, "DDPM": {0.1: {"psnr": 31.0}}},
              "unseen CT": {"NLM": {0.1: {"psnr": 29.0}}, "BM4D": {0.1: {"psnr": 32.0}}, "DDPM": {0.1: {"psnr": 30.5}}}}
    reporting.plot_vs_level(tmp_path / "p.png", curves, {"psnr": "PSNR (dB)"})
    axes = shown["fig"].axes
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in axes]
    assert colours[0]["DDPM"] == colours[1]["DDPM"] and colours[0]["NLM"] == colours[1]["NLM"]
    assert len({colours[1][m] for m in ("NLM", "BM4D", "DDPM")}) == 3
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["NLM", "DDPM", "BM4D"]
