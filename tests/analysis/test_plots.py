import os
import shutil
import threading
import time
from pathlib import Path

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


def test_png_and_svg_from_the_default_install(tmp_path):
    """Pictures are part of the product: the default install renders them (kaleido 0.2 ships Chromium)."""
    fig = plots.bars([1.0], ["a"])
    assert plots.save_figure(fig, tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in plots.save_figure(fig, tmp_path / "b.svg").read_bytes()[:2000]


def test_html_pictures_share_one_plotly_js_per_folder(tmp_path):
    """Every HTML picture loads the folder's one plotly.min.js (no 4.8 MB inlined per file)."""
    src = plots.plotly_js_source()
    a = plots.save_figure(plots.bars([1.0, -1.0], ["u", "v"]), tmp_path / "a.html")
    b = plots.save_figure(plots.line({"x": [1, 2, 3]}), tmp_path / "b.html")
    other = plots.save_figure(plots.bars([1.0], ["w"]), tmp_path / "sub" / "c.html")
    js = tmp_path / plots.PLOTLY_JS
    assert js.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", plots.PLOTLY_JS, "sub"]
    assert (other.parent / plots.PLOTLY_JS).is_file()  # one copy per output folder
    for page in (a, b, other):
        text = page.read_text()
        assert f'<script charset="utf-8" src="{plots.PLOTLY_JS}"></script>' in text
        assert len(text) < 100_000 < src.stat().st_size  # the bundle is not inlined
    mtime = js.stat().st_mtime_ns
    plots.save_figure(plots.bars([2.0], ["z"]), tmp_path / "a.html")
    assert js.stat().st_mtime_ns == mtime  # an identical copy is kept, not rewritten
    js.write_text("stale")  # e.g. written by another plotly version: replaced
    plots.save_figure(plots.bars([2.0], ["z"]), tmp_path / "d.html")
    assert js.read_bytes() == src.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # fragments embedded in bigger pages (e.g. the scrub report) reference it the same way
    fragment = plots.figure_html(plots.bars([1.0], ["a"]), tmp_path / "frag", full_html=False)
    assert f'src="{plots.PLOTLY_JS}"' in fragment and (tmp_path / "frag" / plots.PLOTLY_JS).is_file()


def test_reports_in_sub_folders_share_the_run_folders_bundle(tmp_path):
    """With ``assets`` (the run folder), the pages of its sub-folders, at any depth, load one copy by a
    relative path; an ``assets`` folder that does not contain the page's folder is not used."""
    run = tmp_path / "run"
    pages = {
        "h1": plots.figure_html(plots.bars([1.0], ["a"]), run / "h1", assets=run),
        "a/b": plots.figure_html(plots.bars([1.0], ["a"]), run / "a" / "b", full_html=False, assets=run),
        ".": plots.figure_html(plots.bars([1.0], ["a"]), run, assets=run),
    }
    assert f'src="../{plots.PLOTLY_JS}"' in pages["h1"] and f'src="../../{plots.PLOTLY_JS}"' in pages["a/b"]
    assert f'src="{plots.PLOTLY_JS}"' in pages["."]
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob(plots.PLOTLY_JS)] == [
        "run/plotly.min.js"
    ]
    elsewhere = plots.figure_html(plots.bars([1.0], ["a"]), tmp_path / "out", assets=run / "h1")
    assert f'src="{plots.PLOTLY_JS}"' in elsewhere and (tmp_path / "out" / plots.PLOTLY_JS).is_file()


def test_every_html_writer_of_the_package_uses_the_shared_bundle():
    """No module writes plotly HTML by itself (which would inline plotly.js again): all go through plots."""
    import interplab

    root = Path(interplab.__file__).parent
    offenders = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        if p.name != "plots.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if any(s in line for s in ("include_plotlyjs", ".write_html(", ".write_image(", ".to_image("))
        or (".to_html(" in line and "plot" in line)
    ]
    assert not offenders, f"write pictures through interplab.plots (figure_html, save_figure): {offenders}"


def test_plot_html_renders_offline_in_headless_chromium(tmp_path):
    """The page opened from disk finds plotly.min.js beside it and draws the chart (real headless Chromium)."""
    chromium = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs it where it can)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    page_path = plots.save_figure(plots.bars([1.0, -2.0], ["u", "v"]), tmp_path / "p.html")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_selector(".main-svg", timeout=20_000)
            assert page.evaluate("typeof Plotly") == "object"
            assert page.locator(".bars .point").count() == 2
        finally:
            browser.close()
    assert not errors


def test_static_picture_without_a_renderer_says_how_in_one_line(tmp_path, monkeypatch):
    def broken(fig, fmt):
        raise RuntimeError("\n\nKaleido requires Google Chrome to be installed.\n\nEither download ...")

    monkeypatch.setattr(plots, "_render", broken)
    fig = plots.bars([1.0], ["a"])
    error = plots.write_image(fig, tmp_path / "x.png")
    assert error is not None and "\n" not in error
    assert "Kaleido requires Google Chrome to be installed" in error and plots.IMAGE_HOWTO in error
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="kaleido==0.2.1"):
        plots.save_figure(fig, tmp_path / "x.png")
    # a fallback renderer is used when given; it gets a path with the right suffix
    seen = []

    def fallback(path: Path) -> None:
        seen.append(path.suffix)
        path.write_bytes(b"\x89PNG fallback")

    assert plots.write_image(fig, tmp_path / "y.png", fallback=fallback) is None
    assert seen == [".png"] and (tmp_path / "y.png").read_bytes() == b"\x89PNG fallback"
    with pytest.raises(ValueError, match="use .png or .svg"):
        plots.write_image(fig, tmp_path / "y.jpg")


def test_a_renderer_that_stops_answering_is_given_up_on(tmp_path, monkeypatch):
    """kaleido 0.2 waits on its Chromium's pipe; a Chromium that never answers gives a one-line reason within
    the timeout, and the next picture starts a fresh renderer."""
    release = threading.Event()

    class Stuck:
        shut = False

        def transform(self, *args, **kwargs):
            release.wait(30)
            return b""

        def _shutdown_kaleido(self):
            self.shut = True
            release.set()

    stuck = Stuck()
    monkeypatch.setattr(plots, "_SCOPE", [stuck])
    monkeypatch.setenv("INTERPLAB_IMAGE_TIMEOUT", "0.5")
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.2.1")
    msg = plots.write_image(plots.bars([1.0], ["a"]), tmp_path / "x.png")
    assert msg is not None and "did not answer in 0.5 s" in msg and "\n" not in msg
    assert not (tmp_path / "x.png").exists() and plots._SCOPE == []
    release.wait(5)
    assert stuck.shut


def test_a_renderer_that_crashed_is_replaced_once(tmp_path, monkeypatch):
    """A kaleido Chromium that died ("Transform failed") is shut down and a fresh renderer draws the picture;
    a second failure in a row gives the one-line reason (and no file)."""
    import kaleido.scopes.plotly as kaleido_plotly

    class Crashed:
        shut = False

        def transform(self, *args, **kwargs):
            raise ValueError("Transform failed. Error stream:\n\n(chromium exited)")

        def _shutdown_kaleido(self):
            self.shut = True

    fresh: list[object] = []

    class Fresh:
        def __init__(self, **kwargs):
            fresh.append(self)

        def transform(self, spec, format):
            return b"\x89PNG fresh"

    crashed = Crashed()
    monkeypatch.setattr(plots, "_SCOPE", [crashed])
    monkeypatch.setattr(kaleido_plotly, "PlotlyScope", Fresh)
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.2.1")
    assert plots.write_image(plots.bars([1.0], ["a"]), tmp_path / "x.png") is None
    assert (tmp_path / "x.png").read_bytes() == b"\x89PNG fresh" and len(fresh) == 1
    assert plots._SCOPE == fresh
    for _ in range(50):  # the crashed one is shut down in a thread
        if crashed.shut:
            break
        threading.Event().wait(0.02)
    assert crashed.shut

    monkeypatch.setattr(kaleido_plotly, "PlotlyScope", lambda **kwargs: Crashed())
    monkeypatch.setattr(plots, "_SCOPE", [Crashed()])
    msg = plots.write_image(plots.bars([1.0], ["a"]), tmp_path / "y.png")
    assert msg is not None and "Transform failed" in msg and "\n" not in msg
    assert not (tmp_path / "y.png").exists()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead and waiting to be reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(
    not Path("/proc/self/stat").exists() or not hasattr(os, "killpg"), reason="needs /proc, killpg"
)
def test_a_renderer_that_stops_answering_leaves_no_process_behind(tmp_path, monkeypatch):
    """kaleido 0.2's own shutdown waits on the lock the stuck transform holds, so its wrapper, kaleido and the
    Chromium processes were left running. A stand-in renderer with kaleido's start-up handshake that starts a
    child of its own (the "Chromium") and never answers: past the timeout, both are killed."""
    import kaleido.scopes.base as kaleido_base

    pids = tmp_path / "pids"
    stand_in = tmp_path / "kaleido"
    stand_in.write_text(
        "#!/bin/sh\n"
        f"echo $$ >> '{pids}'\n"
        f"sh -c 'echo $$ >> \"{pids}\"; exec sleep 300' &\n"
        'echo \'{"code": 0, "message": "Success", "result": null, "version": "0.2.1"}\'\n'
        "read -r spec\n"  # the picture's request; never answered
        "sleep 300\n"
    )
    stand_in.chmod(0o755)
    monkeypatch.setattr(kaleido_base.BaseScope, "executable_path", classmethod(lambda cls: str(stand_in)))
    monkeypatch.setattr(plots, "_SCOPE", [])
    monkeypatch.setenv("INTERPLAB_IMAGE_TIMEOUT", "2")
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.2.1")
    msg = plots.write_image(plots.bars([1.0], ["a"]), tmp_path / "x.png")
    assert msg is not None and "did not answer in 2 s" in msg and plots._SCOPE == []
    started = [int(line) for line in pids.read_text().split()]
    assert len(started) == 2  # the stand-in and its child
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in started), [p for p in started if _alive(p)]
