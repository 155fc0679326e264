"""A preset's training step against its timm twin, split into forward (train mode, loss included)
and backward, paired in one process: fastest call and first quartile of each part
(``benchmarks/RESULTS.md``, "Presets vs timm", Interpretation).

Same pair as ``presets_vs_timm.py`` (timm's random weights loaded into hfactory), batch 8 at the
preset's resolution; 2 warm-up steps of each, then ``--rounds`` rounds that time one step of each,
alternating which goes first. On a shared machine interference only adds time, so the fastest
call is the least disturbed estimate of each model's own cost.

Usage (from the repository root)::

    .venv/bin/python benchmarks/train_step_split.py sam2_hiera_tiny --threads 2 --rounds 16
"""

from __future__ import annotations

import argparse
import time

from common import machine_line, twin_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, ref, size = twin_pair(args.preset)
    images = torch.randn(8, 3, *size)
    labels = torch.randint(0, ref.num_classes or ref.num_features, (8,))

    def step(m) -> tuple[float, float]:
        m.train()
        m.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = F.cross_entropy(m(images), labels)
        t1 = time.perf_counter()
        loss.backward()
        return t1 - t0, time.perf_counter() - t1

    models = {"hfactory": model, "timm": ref}
    for m in models.values():
        step(m), step(m)
    times = {k: [] for k in models}
    for r in range(args.rounds):
        for k in (("hfactory", "timm") if r % 2 == 0 else ("timm", "hfactory")):
            times[k].append(step(models[k]))
    print(machine_line(args.threads))
    print(f"{args.preset}, batch 8, {args.rounds} rounds: fastest (first quartile) seconds")
    for k, rows in times.items():
        fwd, bwd = sorted(f for f, _ in rows), sorted(b for _, b in rows)
        print(f"  {k:8s} forward {fwd[0]:.3f} ({fwd[len(fwd) // 4]:.3f})  backward {bwd[0]:.3f} "
              f"({bwd[len(bwd) // 4]:.3f})  step {min(f + b for f, b in rows):.3f}")
    best = {k: min(f + b for f, b in rows) for k, rows in times.items()}
    print(f"  step ratio timm/hfactory (fastest): {best['timm'] / best['hfactory']:.3f}")


if __name__ == "__main__":
    main()
