"""The short digits runs of the test suite, with their accuracies printed: HVT
(``tests/test_hvt.py``), geme and att0 (``tests/test_thesis.py``), SFT (``tests/test_sft.py``).

The tests assert only a floor above chance; this prints what each reaches with its fixed seed on
this machine (one thread, so the result is the same under load; other CPUs and torch versions
may round differently). The runs call the tests' own spec builders and settings.

Usage (from the repository root)::

    .venv/bin/python benchmarks/digits_short.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine_line

sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    import torch

    import test_hvt
    import test_sft
    import test_thesis
    from hfactory.train import TrainConfig, train

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = test_hvt.tiny_spec(2, img=16, patch=4, dim=32, heads=2, depth=4, in_chans=1)
        m = train(spec, Path(tmp) / "hvt", TrainConfig(epochs=3, lr=5e-3, batch_size=32, progress=False, workers=0,
                                                       seed=0, threads=1))
        rows.append(("HVT (`test_hvt.py`)", m["test_accuracy"]))
        for label, last in (("geme", "geme"), ("att0 soft/soft", {"kind": "att0", "assignment": "soft",
                                                                  "last_assignment": "soft"})):
            m = train(test_thesis.digits_spec(last), Path(tmp) / label.split()[0], TrainConfig(
                epochs=4, lr=5e-3, batch_size=32, progress=False, workers=0, seed=0, threads=1))
            rows.append((f"{label} (`test_thesis.py`)", m["test_accuracy"]))
    rows.append(("SFT (`test_sft.py`)", test_sft.train_digits_sft()))
    print(f"- Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine_line(1)}")
    for label, acc in rows:
        print(f"| {label} | {acc:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
