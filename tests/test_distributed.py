"""``torchrun -m hfactory train`` with 2 CPU processes (gloo): the same result as one process.

One process trains a tiny spec for one epoch with the global batch 359 (1,437 digits images:
4 batches of 359, then 1 image, so the processes' shares are uneven, 180/179, and the last one
is empty for process 1). Two processes under torchrun, DDP, must end with the same weights
(within float tolerance: the loss is summed per process and scaled instead of averaged once,
so roundings differ; AdamW amplifies that to ~1e-5 in 5 steps) and the same test accuracy
(identical in our runs; one borderline test image may flip).
The ``--shift`` augmentation stays on: every process draws the global batch's offsets. The
spec has ``drop_path_rate: 0`` and ``drop_rate: 0`` because stochastic depth and dropout masks
are drawn per process (see hfactory/train/distributed.py).

Then FSDP2 (``--fsdp``, the model built shard by shard) stops after 3 steps with a sharded (DCP)
checkpoint, which 2 and 3 FSDP processes, 2 DDP processes and 1 process resume: each result must
be the uninterrupted DDP run's. The unfinished FSDP run is also read by ``hfactory eval`` and
fine-tuned from (``--init-from``) under FSDP, like one process's run; and ``hfactory pretrain``
(sparse MAE) under torchrun must match one process too. Runs take ~6-10 s each on 2 cores (8
torchrun launches).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hfactory.cli import main  # noqa: E402
from reference_utils import TINY_MAE  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TINY = """\
name: tiny_ddp
img_size: 16
in_chans: 1
num_classes: 10
drop_path_rate: 0.0
drop_rate: 0.0
defaults:
  feedforward: {kind: mlp, hidden_layer_multiplier: 2}
stages:
  - {embedding: 24, depth: 1, token_mixer: {kind: sepconv, kernel_size: 3},
     downsample: {kind: conv, patch_size: 3, stride: 2, padding: 1}}
  - {embedding: 48, depth: 1, token_mixer: attention, num_heads: 2, pos_embed: learned}
"""
ARGS = ["--epochs", "1", "--batch-size", "359", "--lr", "5e-3", "--no-progress", "--threads", "1"]


def torchrun(*args: str, cwd: Path, command: str = "train", nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N -m hfactory train ...``
    (``--standalone`` picks a free port)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "hfactory", command, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=atol, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    (root / "tiny.yaml").write_text(TINY, encoding="utf-8")
    threads = torch.get_num_threads()
    try:
        assert main(["train", str(root / "tiny.yaml"), "--out", str(root / "single"), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads 1 is global state
    return root


def test_two_processes_train_like_one(runs):
    result = torchrun("tiny.yaml", "--out", "ddp", *ARGS, cwd=runs)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 alone prints and writes: one epoch line, one final JSON line, one metrics line
    assert result.stdout.count("epoch 1/1") == 1, result.stdout
    assert "2 processes (DDP, gloo), global batch 359" in result.stdout
    final = json.loads(result.stdout.strip().splitlines()[-1])
    single = json.loads((runs / "single" / "metrics.json").read_text())
    assert final["world_size"] == 2 and final["steps"] == single["steps"] == 5
    # evaluation across ranks: all 360 test images counted once, same accuracy and loss
    assert final["test_images"] == single["test_images"] == 360
    assert abs(final["test_accuracy"] - single["test_accuracy"]) <= 1 / 360  # at most one borderline image
    assert final["test_loss"] == pytest.approx(single["test_loss"], rel=1e-4)
    assert len((runs / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1
    assert_same_weights(runs / "ddp" / "model", runs / "single" / "model", atol=1e-4)
    # and training did move the weights (the comparison is not between two initialisations)
    from hfactory import build_encoder

    torch.manual_seed(0)
    init = build_encoder(runs / "tiny.yaml").state_dict()
    trained = load_file(str(runs / "ddp" / "model" / "model.safetensors"))
    assert max((trained[k] - init[k]).abs().max().item() for k in init) > 1e-3


def test_fsdp_sharded_checkpoint_resumes_with_any_process_count(runs):
    if not (runs / "ddp" / "model").is_dir():
        pytest.skip("needs the DDP run of test_two_processes_train_like_one")
    result = torchrun("tiny.yaml", "--out", "fsdp", "--fsdp", "--stop-at-step", "3", *ARGS, cwd=runs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (FSDP2, gloo)" in result.stdout and "stopped at step 3" in result.stdout
    assert not (runs / "fsdp" / "model").exists()
    # sharded (DCP) checkpoint: one shard file per process, no full weights
    checkpoint = runs / "fsdp" / "checkpoint"
    assert sorted(p.name for p in (checkpoint / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model.safetensors").exists()
    # the unfinished run's shards read back whole in one process: one process's weights at step 3
    # (a run without --fsdp stopped there; float noise of the scaled shares, as below)
    from hfactory.train.checkpoint import read_sharded_weights

    threads = torch.get_num_threads()
    try:
        assert main(["train", str(runs / "tiny.yaml"), "--out", str(runs / "one_at_3"), "--stop-at-step", "3",
                     *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    at_3 = load_file(str(runs / "one_at_3" / "checkpoint" / "model.safetensors"))
    shards = read_sharded_weights(checkpoint / "dcp")
    assert shards.keys() == at_3.keys()
    for name in at_3:
        torch.testing.assert_close(shards[name], at_3[name], rtol=1e-3, atol=1e-4, msg=name)
    for name in ("fsdp_as_ddp", "fsdp_as_one", "fsdp_as_three", "fsdp_stopped"):
        shutil.copytree(runs / "fsdp", runs / name)
    resume = ["--resume", "--no-progress", "--threads", "1"]
    result = torchrun("tiny.yaml", "--out", "fsdp", "--fsdp", *resume, cwd=runs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    result = torchrun("tiny.yaml", "--out", "fsdp_as_ddp", *resume, cwd=runs)
    assert result.returncode == 0, result.stderr[-3000:]
    # resharded: 2 processes wrote the shards, 3 read them (global batch 359: shares 120/120/119)
    result = torchrun("tiny.yaml", "--out", "fsdp_as_three", "--fsdp", *resume, cwd=runs, nproc=3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 processes (FSDP2, gloo)" in result.stdout
    try:
        assert main(["train", str(runs / "tiny.yaml"), "--out", str(runs / "fsdp_as_one"), *resume]) == 0
    finally:
        torch.set_num_threads(threads)
    # the sharded initialisation and checkpoint continue exactly where DDP would have been
    assert_same_weights(runs / "fsdp" / "model", runs / "ddp" / "model", atol=1e-6)
    assert_same_weights(runs / "fsdp_as_ddp" / "model", runs / "ddp" / "model", atol=1e-6)
    # one process, or three: the loss shares are summed differently (float noise, as above)
    assert_same_weights(runs / "fsdp_as_one" / "model", runs / "ddp" / "model", atol=1e-4)
    assert_same_weights(runs / "fsdp_as_three" / "model", runs / "ddp" / "model", atol=1e-4)


def test_eval_and_init_from_read_an_unfinished_fsdp_run(runs, capsys):
    if not (runs / "fsdp_stopped").is_dir():
        pytest.skip("needs the FSDP run of test_fsdp_sharded_checkpoint_resumes_with_any_process_count")
    # hfactory eval on the run stopped at step 3 (its checkpoint holds DCP shards only) gives what
    # the same weights give as one process's checkpoint (one borderline image may flip)
    results, threads = [], torch.get_num_threads()
    try:
        for run in ("fsdp_stopped", "one_at_3"):
            capsys.readouterr()
            assert main(["eval", str(runs / run), "--threads", "1"]) == 0
            results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    finally:
        torch.set_num_threads(threads)  # --threads 1 is global state
    assert results[0]["images"] == results[1]["images"] == 360
    assert abs(results[0]["test_accuracy"] - results[1]["test_accuracy"]) <= 1 / 360
    assert results[0]["test_loss"] == pytest.approx(results[1]["test_loss"], rel=1e-3)
    # fine-tuning under FSDP from those shards: rank 0 loads them whole and broadcasts them into
    # every process's shards. A tiny lr keeps the result next to where it started, so the start
    # is visible: the shards for the encoder, the seed's initialisation for the new classifier.
    fine = ["--init-from", "fsdp_stopped", "--epochs", "1", "--batch-size", "359", "--lr", "1e-6", "--no-progress",
            "--threads", "1"]
    result = torchrun("tiny.yaml", "--out", "fine_fsdp", "--fsdp", *fine, cwd=runs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised" in result.stdout and "fsdp_stopped" in result.stdout
    cwd = os.getcwd()
    try:
        os.chdir(runs)
        assert main(["train", "tiny.yaml", "--out", "fine_one", *fine]) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    assert_same_weights(runs / "fine_fsdp" / "model", runs / "fine_one" / "model", atol=1e-6)
    from hfactory import build_encoder
    from hfactory.train.checkpoint import read_sharded_weights

    torch.manual_seed(0)
    init = build_encoder(runs / "tiny.yaml").state_dict()
    start = read_sharded_weights(runs / "fsdp_stopped" / "checkpoint" / "dcp")
    tuned = load_file(str(runs / "fine_fsdp" / "model" / "model.safetensors"))
    encoder = [k for k in init if not k.startswith("head.")]
    assert max((start[k] - init[k]).abs().max().item() for k in encoder) > 1e-3  # 3 steps at lr 5e-3
    assert max((tuned[k] - start[k]).abs().max().item() for k in encoder) < 1e-4  # 5 steps at lr 1e-6
    assert max((tuned[k] - init[k]).abs().max().item() for k in init if k.startswith("head.")) < 1e-4


def test_refused_out_dir_is_reported_once_and_untouched(runs):
    other = runs / "other.yaml"
    other.write_text(TINY.replace("embedding: 48", "embedding: 32"), encoding="utf-8")
    before = {p: p.stat().st_mtime_ns for p in (runs / "single").rglob("*")}
    result = torchrun("other.yaml", "--out", "single", *ARGS, cwd=runs)
    assert result.returncode != 0
    assert result.stderr.count("already holds a run of another spec") == 1, result.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (runs / "single").rglob("*")} == before




def test_two_processes_pretrain_like_one(runs):
    # Every process draws the global batch's masks, so two processes see the same masked units
    # as one; the reconstruction loss is a mean over masked patches, averaged across shares.
    (runs / "tiny_mae.yaml").write_text(TINY_MAE, encoding="utf-8")  # no drop path: its masks differ per process
    args = ["--epochs", "1", "--batch-size", "359", "--lr", "3e-3", "--no-progress", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main(["pretrain", str(runs / "tiny_mae.yaml"), "--out", str(runs / "mae_single"), *args]) == 0
    finally:
        torch.set_num_threads(threads)
    result = torchrun("tiny_mae.yaml", "--out", "mae_ddp", *args, cwd=runs, command="pretrain")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1/1") == 1, result.stdout
    final = json.loads(result.stdout.strip().splitlines()[-1])
    single = json.loads((runs / "mae_single" / "metrics.json").read_text())
    assert final["world_size"] == 2 and final["steps"] == single["steps"] == 5
    assert final["test_loss"] == pytest.approx(single["test_loss"], rel=1e-3)
    a = load_file(str(runs / "mae_ddp" / "encoder" / "model.safetensors"))
    b = load_file(str(runs / "mae_single" / "encoder" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("qkv.bias"):
            # The key bias's true gradient is exactly zero (softmax ignores a shift shared by all
            # keys): AdamW normalises float noise there into lr-sized steps. Compare q and v biases.
            n = a[name].shape[0] // 3
            a[name], b[name] = (torch.cat([t[:n], t[2 * n:]]) for t in (a[name], b[name]))
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)
