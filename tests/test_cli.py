"""The ``hfactory`` command line, in-process through ``hfactory.cli.main``: summary (GMACs against
timm counted the same way, activation memory against a real CPU run), presets, bench, and
bad input on every command (exit status 2, one message on stderr, no traceback, nothing
overwritten)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import hfactory  # noqa: E402
from hfactory.cli import main  # noqa: E402
from hfactory.summary import count_macs, saved_activation_bytes, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POOLFORMER = ROOT / "examples" / "poolformer_s12.yaml"

TINY = """\
name: tiny_cli
img_size: 16
in_chans: 1
num_classes: 10
defaults:
  feedforward: {kind: mlp, hidden_layer_multiplier: 2}
stages:
  - {embedding: 24, depth: 1, token_mixer: {kind: sepconv, kernel_size: 3},
     downsample: {kind: conv, patch_size: 3, stride: 2, padding: 1}}
  - {embedding: 48, depth: 2, token_mixer: attention, num_heads: 2, pos_embed: learned}
"""

# ~700M parameters, global attention in every stage (shared with benchmarks/summary_large.py).
LARGE = ROOT / "benchmarks" / "specs" / "large_attention.yaml"


@pytest.fixture()
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY, encoding="utf-8")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_clean_error(status: int, err: str, *needles: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for needle in needles:
        assert needle in err, err


# -- summary -----------------------------------------------------------------------------------

def test_summary_gmacs_match_timm_counted_the_same_way(capsys):
    timm = pytest.importorskip("timm")
    status, out, _ = run(capsys, "summary", str(POOLFORMER), "--json")
    assert status == 0
    ours = json.loads(out)
    assert ours["total"]["params"] == 11_915_176

    ref = timm.create_model("poolformer_s12", pretrained=False, device="meta")
    parts = {"stem": ref.stem, **{f"stage{i}": s for i, s in enumerate(ref.stages)}}
    macs = count_macs(ref, torch.empty(1, 3, 224, 224, device="meta"), parts)
    assert ours["total"]["gmacs"] == pytest.approx(macs["total"] / 1e9, rel=1e-6)
    assert ours["total"]["gmacs"] == pytest.approx(1.812, abs=0.001)  # timm's published GMACs for poolformer_s12
    # per stage: our stage 0 holds the stem
    ref_stages = [macs["stem"] + macs["stage0"]] + [macs[f"stage{i}"] for i in (1, 2, 3)]
    for stage, ref_macs in zip(ours["stages"], ref_stages):
        assert stage["gmacs"] == pytest.approx(ref_macs / 1e9, rel=1e-6)
    assert ours["head"]["gmacs"] == pytest.approx(macs["head"] / 1e9, rel=1e-6)
    assert [s["params"] for s in ours["stages"]] == [
        sum(p.numel() for p in ref.stem.parameters()) + sum(p.numel() for p in ref.stages[0].parameters()),
        *[sum(p.numel() for p in ref.stages[i].parameters()) for i in (1, 2, 3)]]


@pytest.mark.parametrize("name", hfactory.list_models())
def test_preset_gmacs_and_params_match_timm(name):
    """Every preset named after a timm model has timm's parameter count and GMACs (both counted
    by the same code on the meta device, in this process)."""
    timm = pytest.importorskip("timm")
    if not timm.is_model(name):
        pytest.skip(f"timm has no {name}")
    spec = hfactory.load_preset(name)
    ours = summarize(spec)
    ref = timm.create_model(name, pretrained=False, num_classes=spec.num_classes, device="meta")
    macs = count_macs(ref, torch.empty(1, spec.in_chans, *spec.img_hw, device="meta"))
    assert ours["total"]["params"] == sum(p.numel() for p in ref.parameters())
    assert ours["total"]["gmacs"] == pytest.approx(macs["total"] / 1e9, rel=1e-6)


def test_summary_table_rows_and_totals(capsys, tiny):
    status, out, _ = run(capsys, "summary", str(tiny), "--batch", "4")
    assert status == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    assert "GMACs" in lines[header] and "act. mem (batch 4)" in lines[header]
    rows = lines[header + 1:header + 5]
    assert [r.split()[0] for r in rows] == ["0", "1", "head", "total"]
    assert "16x16 -> 8x8" in rows[0] and "sepconv3" in rows[0] and "attention" in rows[1]
    summary = summarize(hfactory.load_spec(tiny), batch=4)
    plan = hfactory.resolve(hfactory.load_spec(tiny))
    assert [s["tokens"] for s in summary["stages"]] == [s.seq_len for s in plan.stages] == [64, 16]
    assert [s["heads"] for s in summary["stages"]] == [None, 2]
    model = hfactory.build_encoder(hfactory.load_spec(tiny))
    assert [s["params"] for s in summary["stages"]] == [sum(p.numel() for p in st.parameters()) for st in model.stages]
    own = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("stages."))
    assert summary["head"]["params"] == own > 0  # the final norm and the classifier
    assert summary["total"]["params"] == sum(p.numel() for p in model.parameters())
    assert f"{summary['total']['params']:,}" in out


def test_activation_memory_on_meta_equals_a_real_cpu_run(tiny):
    """The meta-device estimate (fused attention emulated) is what a real CPU forward saves
    with PyTorch's own fused SDPA kernel, storage for storage."""
    spec = hfactory.load_spec(tiny)
    torch.manual_seed(0)
    real = hfactory.build_encoder(spec)
    with torch.device("meta"):
        meta = hfactory.HierarchicalEncoder(spec)
    for model, x, fused in ((real, torch.randn(3, 1, 16, 16), False),
                            (meta, torch.empty(3, 1, 16, 16, device="meta"), True)):
        parts = {f"stage{i}": s for i, s in enumerate(model.stages)}
        if fused:
            estimate = saved_activation_bytes(model, x, parts, fused_attention=True)
        else:
            measured = saved_activation_bytes(model, x, parts, fused_attention=False)
    assert estimate == measured and estimate["total"] > 0


def test_activation_memory_grows_with_batch_and_with_math_attention(tiny, tmp_path):
    spec = hfactory.load_spec(tiny)
    one, four = summarize(spec, batch=1), summarize(spec, batch=4)
    # saved activations are per image; only the (batch-independent) position embedding table
    # broadcast does not scale, so batch 4 is about 4x batch 1
    assert four["total"]["activation_bytes"] == pytest.approx(4 * one["total"]["activation_bytes"], rel=0.02)
    assert four["total"]["gmacs"] == one["total"]["gmacs"]  # GMACs are per image
    # at 64x64 stage 1 has N = 16x16 = 256 tokens: the math path keeps each of its 2 attention
    # blocks' (B, H, N, N) fp32 probabilities, where the fused kernel keeps O(N) (out, logsumexp)
    big = hfactory.load_spec(TINY.replace("img_size: 16", "img_size: 64"))
    fused, math = summarize(big, batch=4), summarize(big.model_copy(update={"attn_backend": "math"}), batch=4)
    probs = 2 * (4 * 2 * 256 * 256 * 4)
    extra = math["stages"][1]["activation_bytes"] - fused["stages"][1]["activation_bytes"]
    assert extra == pytest.approx(probs, rel=0.05)
    assert math["stages"][0]["activation_bytes"] == fused["stages"][0]["activation_bytes"]  # no attention there


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the child's VmHWM from /proc (Linux)")
def test_large_spec_summarises_fast_without_allocating():
    spec = LARGE
    # Peak RSS of the child itself: VmHWM belongs to the new address space, whereas Linux carries
    # ru_maxrss across fork + exec, so it would report this (pytest) process's peak when larger.
    code = ("import json, sys; from hfactory.cli import main; main(['summary', sys.argv[1], '--json']); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))")
    result = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    *text, maxrss_kib = result.stdout.strip().splitlines()
    summary = json.loads("\n".join(text))
    assert summary["total"]["params"] > 600e6
    assert summary["param_bytes"] > 2.4 * 2**30
    assert int(maxrss_kib) * 1024 < 2**30 * 1.5  # the 2.6 GiB of weights were never allocated
    assert summary["seconds"] < 30
    assert summary["stages"][2]["heads"] == 32 and summary["stages"][0]["tokens"] == 3136
    assert summary["total"]["gmacs"] > 100


def test_summary_bad_input(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {embedding: 64, token_mixer: poolng}\n", encoding="utf-8")
    assert_clean_error(*run(capsys, "summary", str(bad))[::2], "stages.0.token_mixer.kind", "did you mean 'pooling'")
    plan = tmp_path / "plan.yaml"
    plan.write_text("stages:\n  - {embedding: 64, token_mixer: attention, num_heads: 5}\n", encoding="utf-8")
    assert_clean_error(*run(capsys, "summary", str(plan))[::2], "stages.0.num_heads")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [\n", encoding="utf-8")
    assert_clean_error(*run(capsys, "summary", str(broken))[::2], "invalid spec YAML")
    assert_clean_error(*run(capsys, "summary", str(tmp_path / "missing.yaml"))[::2], "not found")
    assert_clean_error(*run(capsys, "summary", "no_such_preset")[::2], "unknown preset 'no_such_preset'")
    assert_clean_error(*run(capsys, "summary", str(POOLFORMER), "--batch", "0")[::2], "--batch 0")


# -- presets -----------------------------------------------------------------------------------

def test_presets_listing_and_use(capsys, monkeypatch, tmp_path, tiny):
    import hfactory.presets as presets

    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path / "presets")
    (tmp_path / "presets").mkdir()
    status, out, err = run(capsys, "presets")
    assert status == 0 and out == "" and "no presets" in err
    for name in ("tiny_b", "tiny_a", "other"):
        (tmp_path / "presets" / f"{name}.yaml").write_text(TINY, encoding="utf-8")
    assert run(capsys, "presets")[1].splitlines() == ["other", "tiny_a", "tiny_b"]
    assert run(capsys, "presets", "--pattern", "tiny*")[1].splitlines() == ["tiny_a", "tiny_b"]
    status, _, err = run(capsys, "presets", "--pattern", "nothing*")
    assert status == 1 and "no presets matching 'nothing*'" in err
    status, out, _ = run(capsys, "summary", "tiny_a", "--json")  # a preset name works as SPEC
    assert status == 0 and json.loads(out)["name"] == "tiny_cli"
    assert_clean_error(*run(capsys, "summary", "tiny_c")[::2], "unknown preset 'tiny_c'", "did you mean")


# -- bench -------------------------------------------------------------------------------------

def test_paired_timing_interleaves_and_pairs(monkeypatch):
    from hfactory import bench

    clock = {"t": 0.0}
    calls = []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])

    def model(name, seconds):
        def call():
            calls.append(name)
            clock["t"] += seconds
        return call

    result = bench.paired_timing({"hf": model("hf", 1.0), "ref": model("ref", 2.0)}, batch=4, rounds=5, warmup=1)
    assert calls == ["hf", "ref"] + ["hf", "ref", "ref", "hf", "hf", "ref", "ref", "hf", "hf", "ref"]
    assert result.times == {"hf": [1.0] * 5, "ref": [2.0] * 5}
    assert result.ratio == 2.0 and result.images_per_s("hf") == 4.0
    with pytest.raises(ValueError):
        bench.paired_timing({"hf": model("hf", 1.0)}, batch=1, rounds=0)


def test_bench_against_timm(capsys):
    pytest.importorskip("timm")
    threads = torch.get_num_threads()
    try:
        status, out, err = run(capsys, "bench", str(POOLFORMER), "--vs", "timm:poolformer_s12", "--batch", "2",
                               "--img-size", "64", "--rounds", "5", "--warmup", "1", "--threads", "1", "--json")
        assert status == 0, err
        result = json.loads(out)
        assert result["img_size"] == [64, 64] and result["threads"] == 1 and result["mode"] == "inference"
        ours, ref = result["models"]["hfactory"], result["models"]["timm:poolformer_s12"]
        assert ours["params"] == ref["params"] == 11_915_176
        assert len(ours["times_s"]) == len(ref["times_s"]) == 5 and result["ratio"] > 0
        status, out, err = run(capsys, "bench", str(POOLFORMER), "--vs", "timm:poolformer_s12", "--batch", "2",
                               "--img-size", "32", "--rounds", "5", "--warmup", "0", "--threads", "1", "--train")
        assert status == 0, err
        assert "train (forward + backward)" in out and "speed ratio hfactory/poolformer_s12" in out
    finally:
        torch.set_num_threads(threads)


def test_bench_bad_input(capsys, monkeypatch):
    pytest.importorskip("timm")
    assert_clean_error(*run(capsys, "bench", str(POOLFORMER), "--vs", "poolformer_s12")[::2], "expected timm:")
    assert_clean_error(*run(capsys, "bench", str(POOLFORMER), "--vs", "timm:poolformer_s99", "--rounds", "5")[::2],
                       "timm has no model 'poolformer_s99'", "poolformer_s12")
    assert_clean_error(*run(capsys, "bench", str(POOLFORMER), "--rounds", "3")[::2], "--rounds 3")
    assert_clean_error(*run(capsys, "bench", str(POOLFORMER), "--img-size", "1", "2", "3")[::2], "--img-size")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    assert_clean_error(*run(capsys, "bench", str(POOLFORMER), "--vs", "timm:poolformer_s12", "--batch", "1",
                            "--img-size", "32")[::2], "timm, which is not installed")


# -- train / eval ------------------------------------------------------------------------------

def test_train_help_says_batch_is_global(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "global" in out and "torchrun --nproc_per_node=N -m hfactory train" in out and "--fsdp" in out


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_train_and_eval_bad_input(capsys, tmp_path, tiny):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("num_heads: 2", "num_heads: 5"), encoding="utf-8")
    assert_clean_error(*run(capsys, "train", str(bad), "--out", str(out))[::2], "stages.1.num_heads")
    assert_clean_error(*run(capsys, "train", "no_such_preset", "--out", str(out))[::2], "unknown preset")
    assert_clean_error(*run(capsys, "train", str(tiny), "--out", str(out), "--data", str(tmp_path / "nodata"),
                            "--no-progress")[::2], "nodata")
    assert_clean_error(*run(capsys, "train", str(tiny), "--out", str(out), "--fsdp", "--no-progress")[::2],
                       "--fsdp needs several processes")
    assert_clean_error(*run(capsys, "train", str(tiny), "--out", str(out), "--resume", "--no-progress")[::2],
                       "holds no run to resume")
    assert not out.exists()  # nothing was written by any of these
    assert_clean_error(*run(capsys, "eval", str(tmp_path / "no_run"))[::2], "no saved model")


def test_checkpoint_of_another_spec_is_refused(capsys, tmp_path, tiny):
    pytest.importorskip("sklearn")
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("embedding: 48", "embedding: 32"), encoding="utf-8")
    fast = ["--batch-size", "64", "--stop-at-step", "1", "--no-progress", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main(["train", str(tiny), "--out", str(tmp_path / "a"), *fast]) == 0
        assert main(["train", str(other), "--out", str(tmp_path / "b"), *fast]) == 0
    finally:
        torch.set_num_threads(threads)
    # b's run.json says `other`, but its checkpoint is now a's (of `tiny`)
    (tmp_path / "b" / "checkpoint").rename(tmp_path / "b_checkpoint")
    (tmp_path / "a" / "checkpoint").rename(tmp_path / "b" / "checkpoint")
    before = _snapshot(tmp_path / "b")
    status, _, err = run(capsys, "train", str(other), "--out", str(tmp_path / "b"), "--resume", "--stop-at-step", "2",
                         "--no-progress")
    assert_clean_error(status, err, "cannot be resumed with this spec")
    assert _snapshot(tmp_path / "b") == before
    # eval of the run: its checkpoint's spec is not the run's
    assert_clean_error(*run(capsys, "eval", str(tmp_path / "b"))[::2], "spec hash")


def test_python_dash_m_entry_point_exit_status(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hfactory", "summary", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2 and "Traceback" not in result.stderr and "not found" in result.stderr


def test_summary_without_meta_support_still_reports_the_plan(capsys, monkeypatch, tiny):
    import hfactory.summary as summary

    def no_meta_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::some_op' with arguments from the 'Meta' backend")

    monkeypatch.setattr(summary, "count_macs", no_meta_kernel)
    status, out, _ = run(capsys, "summary", str(tiny))
    assert status == 0
    assert "not measured: the model does not run on the meta device" in out and "'Meta' backend" in out
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert total[-2:] == ["-", "-"] and total[-3].endswith("k")  # params are still counted (e.g. 74.6k)


def test_summary_states_the_mae_verdict(capsys):
    status, out, _ = run(capsys, "summary", "mae_hiera_tiny_224")
    assert status == 0 and "sparse MAE pretraining (mask units): compatible" in out
    status, out, _ = run(capsys, "summary", "caformer_s18")  # no mask units: nothing to say
    assert status == 0 and "MAE" not in out


# -- user errors vs internal errors ------------------------------------------------------------

@pytest.mark.parametrize("error", [ValueError("Expected all tensors to be on the same device"),
                                   RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                                   KeyError("stages")])
def test_internal_error_exits_1_with_traceback_and_bug_line(capsys, monkeypatch, tiny, error):
    """An exception that is not one of hfactory's user errors (here raised from deep inside the
    summary, as torch would) is a bug: traceback, one line saying so, exit 1, never exit 2."""
    import hfactory.plan as plan

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(plan, "resolve", broken)  # summarize() looks it up when it runs
    status, _, err = run(capsys, "summary", str(tiny))
    assert status == 1, err
    assert "Traceback (most recent call last)" in err and "in broken" in err  # the full traceback
    last = err.strip().splitlines()[-1]
    assert last.startswith("hfactory summary: internal error (a bug; please report it with the traceback above)")
    assert type(error).__name__ in last and str(error).strip("'") in last
    assert "hfactory summary: error:" not in err  # not dressed up as bad input


@pytest.mark.parametrize("make", [lambda: hfactory.PlanError("stages.1.num_heads", "5 heads do not divide 48"),
                                  lambda: __import__("hfactory.errors").errors.UsageError("--batch 0: must be >= 1"),
                                  lambda: FileNotFoundError("data directory /nowhere not found")])
def test_user_errors_exit_2_without_traceback(capsys, monkeypatch, tiny, make):
    import hfactory.plan as plan

    error = make()

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(plan, "resolve", refuse)  # summarize() looks it up when it runs
    status, _, err = run(capsys, "summary", str(tiny))
    assert_clean_error(status, err, f"hfactory summary: error: {error}")
    assert "internal error" not in err


def test_what_a_user_error_is():
    """The CLI (exit 2) and torchrun processes (hfactory.train.distributed) classify failures with
    the one set in hfactory.errors: hfactory's types, validation, missing paths; not built-ins."""
    from pydantic import BaseModel

    from hfactory.errors import USER_ERRORS, NonFiniteLossError, OverrideError, QuietAbort, UsageError, is_user_error

    class Strict(BaseModel):
        depth: int

    try:
        Strict(depth="deep")
    except Exception as err:  # pydantic's ValidationError
        invalid = err
    errors = [UsageError("x"), hfactory.PlanError("a", "b"), OverrideError("p", "m"), NonFiniteLossError("nan"),
              QuietAbort(), invalid, FileNotFoundError("f"), IsADirectoryError("d"), NotADirectoryError("n"),
              ValueError("torch"), RuntimeError("torch"), TypeError("t"), KeyError("k"), PermissionError("p")]
    assert [is_user_error(e) for e in errors] == [isinstance(e, USER_ERRORS) for e in errors]
    assert [is_user_error(e) for e in errors] == [True] * 9 + [False] * 5


def test_training_library_never_imports_the_cli():
    """The command line imports the training library, never the reverse (the import graph is a DAG)."""
    import ast

    for path in (ROOT / "hfactory" / "train").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = [a.name for a in node.names]
                assert not (target in ("..cli", "hfactory.cli") or target.startswith(("..cli.", "hfactory.cli."))
                            or (target in ("..", "hfactory") and "cli" in names)), f"{path.name} imports {target}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("hfactory.cli") for a in node.names), path.name


def test_building_the_parser_does_not_import_torch():
    code = ("import sys; from hfactory.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'sklearn')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
