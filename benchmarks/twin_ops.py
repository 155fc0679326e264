"""Which aten ops an hfactory preset and its timm twin call, and how often, on which shapes: the
rows where the two differ (``benchmarks/RESULTS.md``, "Presets vs timm", Interpretation).

One warm-up call of each model, then one profiled call (``torch.profiler``, CPU, shapes
recorded), batch 2 at the preset's resolution, one thread. Pure views (``view``, ``reshape``,
``transpose``, ...) and allocations are left out: they move no data. Counts, not times, so the
result does not depend on how busy the machine is.

Usage (from the repository root)::

    .venv/bin/python benchmarks/twin_ops.py sam2_hiera_tiny train
    .venv/bin/python benchmarks/twin_ops.py swinv2_tiny_window8_256 infer
"""

from __future__ import annotations

import argparse
import collections

from common import twin_pair

VIEWS = {"view", "reshape", "as_strided", "transpose", "permute", "empty", "expand", "t", "slice", "select",
         "unsqueeze", "squeeze", "_unsafe_view", "detach", "alias", "empty_strided", "resolve_conj",
         "resolve_neg", "lift_fresh", "contiguous", "result_type", "to", "unbind", "split", "chunk", "narrow",
         "flatten", "view_as", "_reshape_alias", "clone"}


def op_counts(model, images, labels, mode: str) -> collections.Counter:
    """``(op, input shapes) -> calls`` of one inference call or one training step of ``model``."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    def run():
        if mode == "infer":
            model.eval()
            with torch.inference_mode():
                model(images)
        else:
            model.train()
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()

    run()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    counts = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("aten::") and event.key[len("aten::"):] not in VIEWS:
            counts[(event.key, str(event.input_shapes))] += event.count
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset")
    parser.add_argument("mode", choices=("infer", "train"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, ref, size = twin_pair(args.preset)
    images, labels = torch.randn(2, 3, *size), torch.zeros(2, dtype=torch.long)
    ours, theirs = (op_counts(m, images, labels, args.mode) for m in (model, ref))
    print("hfactory timm  op  input shapes   (rows where the counts differ)")
    for key in sorted(ours.keys() | theirs.keys()):
        if ours[key] != theirs[key]:
            print(f"{ours[key]:8d} {theirs[key]:4d}  {key[0]}  {key[1][:140]}")
    print(f"identical (op, shapes) rows: {sum(1 for k in ours.keys() & theirs.keys() if ours[k] == theirs[k])}")


if __name__ == "__main__":
    main()
