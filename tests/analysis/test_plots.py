import pytest
import torch

from interplab import plots


def test_heatmap_labels_and_duplicates():
    fig = plots.heatmap(
        torch.arange(6.0).view(2, 3),
        x_labels=["a", "b", "a"],
        y_labels=["L0", "L1"],
        x_title="pos",
        y_title="layer",
        text=[["x"] * 3] * 2,
    )
    trace = fig.data[0]
    assert len(set(trace.x)) == 3  # equal token strings stay separate columns
    assert list(trace.y) == ["L0", "L1"] and trace.z[1][2] == 5.0
    with pytest.raises(ValueError, match="labels"):
        plots.heatmap(torch.zeros(2, 3), x_labels=["a"], y_labels=["0", "1"])
    with pytest.raises(ValueError, match="2-d"):
        plots.heatmap(torch.zeros(3))


def test_views_and_save(tmp_path):
    view = plots.attention_view(torch.softmax(torch.randn(2, 3, 3), -1), ["a", "b", "c"])
    assert len(view.layout.updatemenus[0].buttons) == 2
    plots.token_highlight(["a", "b"], [0.5, -1.0])
    plots.line({"x": [1, 2, 3]}, x_labels=["a", "b", "c"])
    plots.scatter([1, 2], [2, 3], labels=["p", "q"], diagonal=True)
    plots.bars([1.0, -1.0], ["u", "v"])
    path = plots.save_figure(view, tmp_path / "v.html")
    assert "plotly" in path.read_text()[:200000].lower()
    with pytest.raises(ValueError, match="use .html, .png or .svg"):
        plots.save_figure(view, tmp_path / "v.pdf")


@pytest.mark.slow
def test_png(tmp_path):
    path = plots.save_figure(plots.bars([1.0], ["a"]), tmp_path / "b.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
