"""Malformed and hostile specs (issue 5): each is refused quickly, with bounded memory, by a clear
``ValueError`` / pydantic ``ValidationError`` / ``PlanError`` that names the field when there is
one; nothing in a document is ever executed, and no size in it reaches an allocator unchecked.

Limits these tests pin (see README, "Reliability"): documents over ``MAX_SPEC_BYTES`` (100 kB)
are refused before parsing; YAML nesting deeper than ``MAX_NESTING`` (64) while parsing;
aliases, Python tags, duplicate and unhashable keys always; any integer over ``MAX_SIZE``
(65536) and more than ``MAX_BLOCKS`` (1024) blocks by the plan, before any tensor exists.
Time is CPU time of the call (the machines running CI are shared), memory the growth of the
peak RSS of a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import hfactory
from hfactory import PlanError, load_spec, resolve
from hfactory.plan import MAX_BLOCKS
from hfactory.spec.base import MAX_SIZE
from hfactory.spec.io import MAX_NESTING, MAX_SPEC_BYTES, load_yaml

ROOT = Path(__file__).resolve().parents[1]
OK = {"stages": [{"embedding": 32}]}


def refused(source, *types) -> Exception:
    """``load_spec`` + ``resolve`` of ``source`` raise one of ``types`` within 1 s of CPU time."""
    start = time.process_time()
    with pytest.raises(types or (ValueError,)) as info:
        resolve(load_spec(source))
    assert time.process_time() - start < 1.0, f"took {time.process_time() - start:.2f} s of CPU to refuse"
    return info.value


def locs(err: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in err.errors()]


# --------------------------------------------------------------------- nothing is executed

PAYLOADS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "stages: !!python/object/apply:os.system ['touch {marker}']",
    "stages: [{{embedding: !!python/object/apply:os.system ['touch {marker}']}}]",
    "!!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "!!python/object/apply:builtins.exec [\"open('{marker}', 'w').close()\"]",
    "!!python/object/apply:builtins.eval [\"open('{marker}', 'w').close()\"]",
    "stages: !!python/name:os.system",
    "stages: !!python/module:os",
    "stages: !!python/object:pathlib.Path {{}}",
    "!!python/tuple [1, 2]",
    "? !!python/object/apply:os.system ['touch {marker}']\n: 1",
    "stages: !custom [1]",
    "%TAG !p! tag:yaml.org,2002:python/object/apply:\n---\n!p!os.system ['touch {marker}']",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_python_tags_are_refused_and_nothing_runs(payload, tmp_path):
    marker = tmp_path / "pwned"
    text = payload.format(marker=marker)
    err = refused(text)
    assert "invalid spec YAML" in str(err) and ("constructor" in str(err) or "tag" in str(err))
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    refused(path)
    refused(str(path))
    assert not marker.exists()


def test_the_cli_refuses_a_python_tag_cleanly(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.yaml"
    path.write_text(f"stages: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "hfactory", "summary", str(path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "error:" in run.stderr and "Traceback" not in run.stderr
    assert not marker.exists()


# ------------------------------------------------------------- bounded time and memory

PROBE = textwrap.dedent("""
    import json, resource, sys, time
    from hfactory import load_spec, resolve
    path = sys.argv[1]
    source = path if sys.argv[2] == "path" else open(path, encoding="utf-8").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    try:
        resolve(load_spec(source))
        outcome, message = "accepted", ""
    except Exception as err:
        outcome, message = type(err).__name__, str(err)[:300]
    cpu = time.process_time() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # ru_maxrss is in KiB
    print(json.dumps({"outcome": outcome, "message": message, "cpu_s": cpu, "grown_bytes": grown}))
""")


def probe(tmp_path: Path, text: str, as_path: bool = False) -> dict:
    """Load ``text`` in a fresh process: outcome, CPU seconds, peak-RSS growth in bytes."""
    doc = tmp_path / "doc.yaml"
    doc.write_text(text, encoding="utf-8")
    run = subprocess.run([sys.executable, "-c", PROBE, str(doc), "path" if as_path else "text"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr  # no crash, no RecursionError, no MemoryError kill
    return json.loads(run.stdout.strip().splitlines()[-1])


def billion_laughs(levels: int = 9) -> str:
    lines = ['lol0: &lol0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nstages: *lol{levels}\n"


HOSTILE_DOCUMENTS = {
    # 9^10 "lol"s once expanded; refused at the first alias, before any expansion
    "billion laughs": (billion_laughs(), "UsageError", "aliases"),
    "alias in a stage": ("base: &b {embedding: 8}\nstages: [*b, *b]", "UsageError", "aliases"),
    "merge key": ("b: &b {embedding: 8}\nstages: [{<<: *b}]", "UsageError", "aliases"),
    "recursive alias": ("a: &a [*a]", "UsageError", "aliases"),
    "nested [ x 99999": ("[" * 99_999, "UsageError", "nesting too deep"),
    "nested { x 24999": ("{a: " * 24_999, "UsageError", "nesting too deep"),
    "nested - x 49999": ("- " * 49_999, "UsageError", "nesting too deep"),
    "indentation nesting": ("a:\n" + "".join(" " * i + "b:\n" for i in range(1, 440)), "UsageError",
                            "nesting too deep"),
    # the largest document still parsed: 9000 unknown keys, each an error
    "9000 unknown keys": ("{" + ", ".join(f"k{i}: 1" for i in range(9000)) + "}", "ValidationError", "unknown key"),
    "2500 stages": ("stages:\n" + "- {embedding: 8, token_mixer: pooling}\n" * 2500, "PlanError", "blocks"),
    "10 MB document": ("stages: [{embedding: 8}]\nname: " + "x" * 10_000_000, "UsageError", "larger than"),
    "5000-digit integer": ("stages: [{embedding: " + "9" * 5000 + "}]", "UsageError", "too long"),
    "petabyte width": ("stages: [{embedding: 9999999999}]", "PlanError", "larger than 65536"),
    "googol width": ("stages: [{embedding: " + "1" + "0" * 100 + "}]", "PlanError", "101-digit"),
}


@pytest.mark.parametrize("name", list(HOSTILE_DOCUMENTS))
def test_hostile_documents_are_refused_quickly_with_bounded_memory(name, tmp_path):
    text, outcome, needle = HOSTILE_DOCUMENTS[name]
    for as_path in (False, True):
        got = probe(tmp_path, text, as_path)
        assert got["outcome"] == outcome and needle in got["message"], got
        # CPU time (not wall time: CI machines are shared); the largest documents that get parsed
        # (100 kB) take ~0.5 s of pure-Python YAML on a quiet core.
        assert got["cpu_s"] < 2.0, got
        assert got["grown_bytes"] < 50 * 2**20, got


def test_the_size_limit_is_checked_before_reading_a_file(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.seek(2**40)  # a sparse 1 TB file: reading it would never finish
        f.write(b"\n")
    err = refused(path)
    assert str(path) in str(err) and "larger than" in str(err)


def test_nesting_just_under_the_limit_still_parses():
    value = load_yaml("[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1))
    depth = 0
    while isinstance(value, list) and value:
        value, depth = value[0], depth + 1
    assert depth == MAX_NESTING - 2
    with pytest.raises(ValueError, match="nesting too deep"):
        load_yaml("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1))


def test_deeply_nested_python_input_is_a_located_validation_error():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for data in ({"stages": deep}, {"stages": [{"embedding": deep}]}, {"stages": [{"embedding": 8, "defaults": deep}]},
                 {"stages": [{"embedding": 8, "token_mixer": {"kind": "pooling", "pool_size": deep}}]}):
        err = refused(data, ValidationError)
        assert all(loc.startswith("stages") for loc in locs(err))


# ----------------------------------------------------------------- huge numbers, located

@pytest.mark.parametrize("data,loc", [
    ({"stages": [{"embedding": 10**100}]}, "stages.0.embedding"),
    ({"stages": [{"embedding": 9_999_999_999}]}, "stages.0.embedding"),
    ({"stages": [{"embedding": 32}, {"embedding": 2**40}]}, "stages.1.embedding"),
    ({"stages": [{"embedding": 32, "depth": 10**12}]}, "stages.0.depth"),
    ({"defaults": {"depth": 600}, "stages": [{"embedding": 32}, {"embedding": 32}]}, "defaults.depth"),
    ({"stages": [{"embedding": 32, "depth": 600}, {"embedding": 32, "depth": 600}]}, "stages.1.depth"),
    ({"img_size": [10**9, 64], "stages": [{"embedding": 32}]}, "img_size"),
    ({"in_chans": 10**8, "stages": [{"embedding": 32}]}, "in_chans"),
    ({"num_classes": 10**7, "stages": [{"embedding": 32}]}, "num_classes"),
    ({"stages": [{"embedding": 32, "num_heads": 10**20}]}, "stages.0.num_heads"),
    ({"stages": [{"embedding": 32, "seq_len": 10**5000}]}, "stages.0.seq_len"),
    ({"stages": [{"embedding": 32, "feedforward": {"kind": "mlp", "hidden_layer_multiplier": 1e300}}]},
     "stages.0.feedforward.hidden_layer_multiplier"),
    ({"stages": [{"embedding": 32, "token_mixer": {"kind": "sepconv", "expansion_ratio": 1e12}}]},
     "stages.0.token_mixer.expansion_ratio"),
    ({"stages": [{"embedding": 32}], "head": {"kind": "mlp", "hidden_layer_multiplier": 1e9}},
     "head.hidden_layer_multiplier"),
    ({"stages": [{"embedding": 32, "token_mixer": {"kind": "window_attention", "window_size": [7, 10**20]}}]},
     "stages.0.token_mixer.window_size"),
    ({"stages": [{"embedding": 32, "downsample": {"kind": "conv", "patch_size": 2**31, "stride": 4}}]},
     "stages.0.downsample.patch_size"),
    ({"stages": [{"embedding": 32, "norm": {"kind": "groupnorm", "num_groups": 10**30}}]},
     "stages.0.norm.num_groups"),
    ({"mask_unit_size": 10**10, "stages": [{"embedding": 32}]}, "mask_unit_size"),
])
def test_huge_numbers_fail_in_the_plan_before_any_allocation(data, loc):
    err = refused(data, PlanError)
    assert err.loc == loc, err
    with pytest.raises(PlanError):  # building goes through the same plan
        hfactory.build_encoder(data)


def test_numbers_at_the_bounds_are_accepted():
    spec = load_spec({"img_size": [MAX_SIZE, 64], "num_classes": MAX_SIZE, "defaults": {"token_mixer": "pooling"},
                      "stages": [{"embedding": 32, "depth": MAX_BLOCKS}]})
    plan = resolve(spec)
    assert plan.num_blocks == MAX_BLOCKS and plan.img_size == (MAX_SIZE, 64)


def test_a_refused_width_allocates_nothing(tmp_path):
    code = textwrap.dedent("""
        import resource, hfactory
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            hfactory.build_encoder({"stages": [{"embedding": 9999999999}]})
        except hfactory.PlanError as err:
            print(err.loc, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    loc, grown_mib = out.stdout.split()
    assert loc == "stages.0.embedding" and int(grown_mib) < 50, out


def test_within_the_bounds_a_big_model_can_be_sized_on_the_meta_device():
    """The bounds refuse absurd numbers, not big models: a 3.2-billion-parameter spec passes the
    plan, and building it on the meta device (as ``hfactory summary`` does) sizes it without
    allocating; that is the way to check a spec against a machine's memory before building."""
    spec = load_spec({"img_size": 224, "stages": [{"embedding": 8192, "depth": 4, "num_heads": 64}]})
    with torch.device("meta"):
        model = hfactory.HierarchicalEncoder(spec)
    params = sum(p.numel() for p in model.parameters())
    assert params > 3e9 and all(p.is_meta for p in model.parameters())


# ---------------------------------------------------------------- malformed documents

@pytest.mark.parametrize("text,loc", [
    ("stages: [{embedding: wide}]", "stages.0.embedding"),
    ("stages: [{embedding: [8]}]", "stages.0.embedding"),
    ("stages: [{embedding: null}]", "stages.0.embedding"),
    ("stages: [{embedding: 8.5}]", "stages.0.embedding"),
    ("stages: [{embedding: 2001-12-14}]", "stages.0.embedding"),
    ("stages: [{embedding: 8, depth: two}]", "stages.0.depth"),
    ("stages: {embedding: 8}", "stages"),
    ("stages: null", "stages"),
    ("stages: []", "stages"),
    ("stages: [null]", "stages.0"),
    ("stages: [[8]]", "stages.0"),
    ("stages: !!binary aGVsbG8=", "stages"),
    ("stages: !!set {a, b}", "stages.0"),
    ("stages: [{embedding: 8}]\ndefaults: []", "defaults"),
    ("stages: [{embedding: 8}]\nimg_size: [224, 224, 3]", "img_size.tuple[int, int]"),
    ("stages: [{embedding: 8}]\nimg_size: big", "img_size.int"),
    ("stages: [{embedding: 8, token_mixer: [pooling]}]", "stages.0.token_mixer"),
    ("stages: [{embedding: 8, token_mixer: {kind: [pooling]}}]", "stages.0.token_mixer.kind"),
    ("stages: [{embedding: 8, token_mixer: null_mixer}]", "stages.0.token_mixer.kind"),
    ("stages: [{embedding: 8, feedforward: {kind: mlp, hidden_layer_multiplier: .inf}}]",
     "stages.0.feedforward.hidden_layer_multiplier"),
    ("stages: [{embedding: 8, norm: {kind: layernorm, eps: .nan}}]", "stages.0.norm.eps"),
    ("stages: [{embedding: 8, layer_scale: .nan}]", "stages.0.layer_scale.float"),
    ("stages: [{embedding: 8}]\ndrop_path_rate: 1e999", "drop_path_rate"),
    # refused at validation, before the divisor list of the heads message is computed (it used to hang)
    ("stages: [{embedding: 8}]\nmae: {decoder_embedding: 1000000000001, decoder_num_heads: 2}",
     "mae.decoder_embedding"),
    ("stages: [{embedding: 8}]\nmae: {decoder_depth: 100000}", "mae.decoder_depth"),
    ("stages: [{embedding: 8}]\n1: 2", "1"),
    ("stages: [{embedding: 8}]\nnull: 2", "None"),
])
def test_wrong_types_are_located_validation_errors(text, loc):
    err = refused(text, ValidationError)
    assert loc in locs(err), locs(err)
    assert all(e["msg"] for e in err.errors())


@pytest.mark.parametrize("text,needle", [
    ("stages: [{embedding: 8}]\nstages: [{embedding: 9}]", "duplicate key 'stages'"),
    ("stages: [{embedding: 8, embedding: 9}]", "duplicate key 'embedding'"),
    ("stages: [{embedding: 8, token_mixer: {kind: pooling, kind: attention}}]", "duplicate key 'kind'"),
    ("stages: [{embedding: 8}]\n? [a, b]\n: 1", "cannot be a mapping key"),
    ("stages: [{embedding: 8}]\n? {a: 1}\n: 1", "cannot be a mapping key"),
    ("stages: [{embedding: 8}", "invalid spec YAML"),
    ("stages: [{embedding: 8}]]", "invalid spec YAML"),
    ("\tstages: [{embedding: 8}]", "invalid spec YAML"),
    ("stages: [{embedding: 8}]\n--- \nstages: []", "invalid spec YAML"),
    ("- 1\n- 2", "must be a mapping"),
    ("just text", "must be a mapping"),
    ("", "must be a mapping"),
    ("42", "must be a mapping"),
    ("\x00\x01\x02\x03", "invalid spec YAML"),
    ("stages: [{embedding: 8}]\x85\u2028\ufeff\x7f", "invalid spec YAML"),
])
def test_malformed_documents_are_value_errors(text, needle):
    err = refused(text, ValueError)
    assert needle in str(err)


def test_binary_garbage_and_non_utf8_bytes(tmp_path):
    garbage = bytes(range(256)) * 64
    for name, data in {"garbage.yaml": garbage, "latin1.yaml": "stages: [{embedding: 8}]  # caf\xe9".encode("latin-1"),
                       "utf16.yaml": "stages: [{embedding: 8}]".encode("utf-16")}.items():
        path = tmp_path / name
        path.write_bytes(data)
        err = refused(path, ValueError)
        assert str(path) in str(err) and "not UTF-8" in str(err)
    err = refused(garbage.decode("latin-1"), ValueError)
    assert "invalid spec YAML" in str(err)
    with pytest.raises(ValueError, match="must be a mapping"):
        load_spec(garbage)  # bytes are neither a path nor text


def test_the_size_limit_and_the_unknown_keys_rule_hold_together():
    assert MAX_SPEC_BYTES == 100_000
    err = refused("stages: [{embedding: 8}]\n" + "".join(f"k{i}: 1\n" for i in range(30)), ValidationError)
    assert len(err.errors()) == 30
    assert all("valid keys of EncoderSpec" in e["msg"] for e in err.errors())
