"""``hfactory diagram`` (the plan drawn with matplotlib) and ``hfactory sweep --plot/--bench``."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from hfactory import load_spec, resolve  # noqa: E402
from hfactory.cli import main  # noqa: E402
from hfactory.diagram import diagram_text, draw  # noqa: E402
from hfactory.errors import UsageError  # noqa: E402
from hfactory.plan import describe_mixers  # noqa: E402
from hfactory.presets import list_models, load_preset  # noqa: E402
from hfactory.sweep import pareto_front, plot_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
HYBRID = str(ROOT / "examples" / "digits_hybrid.yaml")


def svg_texts(path: Path) -> list[str]:
    """The text of every <text> element (with svg.fonttype none, matplotlib keeps labels as text)."""
    root = ET.parse(path).getroot()
    return ["".join(el.itertext()) for el in root.iter() if el.tag.endswith("}text") or el.tag == "text"]


@pytest.mark.parametrize("source", [f"preset:{n}" for n in list_models()] + [f"example:{n}" for n in EXAMPLES])
def test_every_preset_and_example_draws_every_stage_and_mixer(source, tmp_path):
    kind, name = source.split(":")
    spec = load_preset(name) if kind == "preset" else load_spec(ROOT / "examples" / name)
    plan = resolve(spec)
    path = tmp_path / "d.svg"
    draw(spec, path)
    text = path.read_text(encoding="utf-8")
    assert len(text) > 2000 and "<svg" in text
    labels, drawn = diagram_text(plan), svg_texts(path)
    assert len(labels) == len(spec.stages)  # one box per stage the user wrote
    for i, (stage, label) in enumerate(zip(plan.stages, labels)):
        for needle in (f"stage {i}", f"mixer {describe_mixers(stage)}", f"depth {stage.depth}",
                       f"width {stage.out_chs}"):
            assert needle in label.split("\n")
            assert needle in drawn, (needle, drawn)


def test_layout_changes_are_marked(tmp_path):
    # Hiera-T at 224: stride-4 stem -> 56x56 tokens cut into 8x8-token mask units (32x32 px, arXiv 2306.00989)
    draw(load_preset("hiera_tiny_224"), tmp_path / "h.svg")
    assert "mask units 8x8" in svg_texts(tmp_path / "h.svg")
    # HVT: stage 1's 1-D max pooling leaves a flat sequence of 97 tokens (196 -> 97, arXiv 2103.10619)
    draw(load_preset("hvt_s_1"), tmp_path / "v.svg")
    texts = svg_texts(tmp_path / "v.svg")
    assert "sequence from here" in texts and "grid 97 tokens (sequence)" in texts
    assert "mask units" not in " ".join(texts)


def test_per_block_overrides_are_listed():
    spec = load_spec({
        "name": "tiny", "img_size": 32, "num_classes": 5, "defaults": {"dim_head": 8}, "drop_path_rate": 0.1,
        "stages": [{"embedding": 16, "depth": 1, "downsample": {"kind": "conv", "patch_size": 4},
                    "token_mixer": "pooling"},
                   {"embedding": 32, "depth": 6, "token_mixer": {"kind": "window_attention", "window_size": 4},
                    "blocks": [{"at": [1, -1], "token_mixer": "attention"},
                               {"every": 2, "offset": 1, "drop_path": 0.05},
                               {"at": 5, "feedforward": {"kind": "mlp", "hidden_layer_multiplier": 2}}]}]})
    first, second = (label.split("\n") for label in diagram_text(resolve(spec)))
    assert not [line for line in first if line.startswith("override")]
    overrides = [line for line in second if line.startswith("override")]
    # linear schedule 0.1 * i / 6 over 7 blocks; blocks 1, 3, 5 of stage 1 are set to 0.05 instead
    assert overrides == ["override blocks 1,5: attention", "override own feedforward@5",
                         "override drop_path @1 0.050, @3 0.050, @5 0.050"]


def test_draw_refuses_bad_suffix_and_other_kinds(tmp_path):
    with pytest.raises(UsageError, match=r"\.svg, \.png, \.pdf"):
        draw(load_preset("poolformer_s12"), tmp_path / "x.txt")
    with pytest.raises(UsageError, match="SFT"):
        draw({"stages": []})
    assert not list(tmp_path.iterdir())


def test_cli_writes_the_file_and_prints_its_path(capsys, tmp_path, monkeypatch):
    out = tmp_path / "a.png"
    assert main(["diagram", "poolformer_s12", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.chdir(tmp_path)
    assert main(["diagram", HYBRID, "--set", "stages.2.depth=3"]) == 0
    assert capsys.readouterr().out.strip() == "digits_hybrid.svg"
    assert {"depth 3", "heads 4"} <= set(svg_texts(tmp_path / "digits_hybrid.svg"))


def test_cli_bad_input(capsys, tmp_path):
    assert main(["diagram", "poolformer_s12", "--out", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and ".svg, .png, .pdf" in err and "Traceback" not in err
    assert main(["diagram", str(ROOT / "examples" / "sft" / "digits.yaml")]) == 2
    err = capsys.readouterr().err
    assert "SFTSpec" in err and "stages" in err
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(UsageError, match=r"hfactory\[plot\]"):
        draw(load_preset("poolformer_s12"), tmp_path / "x.svg")


def test_diagram_never_imports_torch():
    code = ("import sys; from hfactory.diagram import draw; from hfactory.presets import load_preset; "
            "draw(load_preset('hiera_tiny_224')); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ------------------------------------------------------------------------------ sweep --plot

def test_pareto_front_on_hand_made_points():
    pts = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, 5), (1, 6)]
    # both minimised: (3,4) and (5,5) lose to (2,3), (1,6) to (1,5); the equal (2,3)s both stay
    assert pareto_front(pts) == [0, 1, 3, 4]
    # second maximised: (1,6) has the fewest first and the most second coordinate
    assert pareto_front(pts, (True, False)) == [6]
    assert pareto_front([(1, 1), (2, 9), (3, 8), (4, 10)], (True, False)) == [0, 1, 3]
    assert pareto_front([]) == []
    with pytest.raises(UsageError):
        pareto_front([(1, 2, 3)])


def test_plot_sweep_draws_params_gmacs_and_speed(tmp_path):
    rows = [{"name": f"m-v{i}", "params": p * 1e6, "gmacs": g, "images_per_s": v}
            for i, (p, g, v) in enumerate([(1, 0.5, 90), (2, 0.3, 50), (3, 0.4, 120)])]
    out = plot_sweep(rows, tmp_path / "p.svg")
    texts = svg_texts(out)
    assert {"parameters (millions)", "GMACs per image", "Pareto front", "images/s (CPU, batch 1)",
            "v0", "v1", "v2"} <= set(texts)
    plot_sweep([{k: v for k, v in r.items() if k != "images_per_s"} for r in rows], tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UsageError, match=r"--plot.*\.svg, \.png, \.pdf"):
        plot_sweep(rows, tmp_path / "p.gif")


def test_sweep_cli_plot_and_bench(capsys, tmp_path):
    out = tmp_path / "p.svg"
    assert main(["sweep", HYBRID, "--grid", "stages.2.depth=1", "--plot", str(out), "--bench", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["images_per_s"] > 0
    assert {"Pareto front", "images/s (CPU, batch 1)"} <= set(svg_texts(out))
    assert main(["sweep", HYBRID, "--grid", "stages.2.depth=1", "--plot", str(tmp_path / "p.gif")]) == 2
    assert ".svg, .png, .pdf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.svg"]
