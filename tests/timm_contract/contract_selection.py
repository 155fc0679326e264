"""Which of timm's ``tests/test_models.py`` tests run on which ``hfactory_*`` model, and why not.

Side-effect free (no timm patching): read by tests/test_timm_contract.py, which checks the
inner run covered what this selects, and by contract_conftest.py, which deselects the rest in
the inner run. A model name here is a timm name (``hfactory_<preset>``); patterns are fnmatch globs.

Families: metaformer (caformer, convformer, poolformer v1/v2: the ``grid`` layout, linear or MLP
heads), hiera (hiera, hiera abs-win, MAE Hiera: the ``units`` layout), sam2 (SAM2's HieraDet
trunk: per-stage windows, per-block overrides), swin and swinv2 (shifted windows,
``head_norm_first``), pvt_v2 (spatial-reduction attention), hvt (ViT with 1-D pooling: a ``grid``
stem, then the ``seq`` layout). A new preset gets every test except the heavy ones by default.
"""

from __future__ import annotations

import fnmatch
from typing import Optional

#: The tests of test_models.py that apply to a model outside timm's own families; all others
#: (pretrained weights, hub inference, tests that name timm models) select no hfactory model.
#: test_model_default_cfgs_non_std is timm's relaxed config test; hfactory's models are standard
#: (NCHW ``forward_features``), the relaxed test runs on them too (see contract_conftest.py).
CONTRACT_TESTS = (
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",
    "test_model_default_cfgs_non_std",
    "test_model_forward_torchscript",
    "test_model_forward_features",
    "test_model_forward_intermediates_features",
    "test_model_forward_intermediates",
    "test_prune_intermediate_layers_contract",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
)

_HVT_SEQ = ("hfactory_hvt_s_[1-4]", "hfactory_hvt_ti_*")  # HVT presets with 1-D pooled (seq) stages
_SEQ_REASON = ("HVT's 1-D pooling leaves N tokens without a 2-D grid; forward_intermediates gives them as an "
               "(N, 1) map, whose N exceeds the test's ceil(H/r)+1 bound for a 2-D map at stride r")
_FEW_STAGES = "fewer than the 3 feature levels the test requires (hvt_s_0 has 1 stage, hvt_s_1 / hvt_ti_1 have 2)"

#: (test, model glob) -> why the test does not apply to these models. Deselected in the inner run.
EXCLUDED = {
    # TorchScript: hfactory's forward runs the plan's shape checks (pydantic, Python) and reads the
    # spec; TorchScript cannot compile that. timm excludes its own Hiera likewise
    # (EXCLUDE_JIT_FILTERS 'hiera_*'); hfactory supports torch.compile / torch.export instead.
    ("test_model_forward_torchscript", "hfactory_*"): "TorchScript cannot compile the forward's pydantic plan "
                                                      "checks (timm excludes its own Hiera: EXCLUDE_JIT_FILTERS)",
    ("test_model_forward_fx_torchscript", "hfactory_*"): "TorchScript after FX: as test_model_forward_torchscript",
    # FX: timm does not trace its own Hiera (EXCLUDE_FX_FILTERS 'hiera*'); the same for ours. FX
    # runs on the other families, as timm's does on MetaFormer and Swin.
    **{(t, g): "timm excludes its Hiera from FX (EXCLUDE_FX_FILTERS 'hiera*')"
       for t in ("test_model_forward_fx", "test_model_backward_fx")
       for g in ("hfactory_hiera_*", "hfactory_mae_hiera_*")},
    # HVT: 2-D feature-map tests (timm keeps its own sequence models, NON_STD_FILTERS, out of them).
    ("test_model_forward_features", "hfactory_hvt_*"): f"{_SEQ_REASON}; hvt_s_0: {_FEW_STAGES}",
    ("test_model_forward_intermediates", "hfactory_hvt_*"): f"{_SEQ_REASON}; hvt_s_0: {_FEW_STAGES}",
    **{("test_model_forward_intermediates_features", g): _SEQ_REASON for g in _HVT_SEQ},
}

#: (test, model glob) -> (an hfactory defect outside the timm integration that fails the test, the
#: exception it raises as "module:Name"). Marked xfail(strict=True, raises=that exception) in the
#: inner run: another failure still fails, and once the defect is fixed the XPASS fails the run
#: and the entry must go. Each names the failing assertion.
KNOWN_BUGS: dict = {}

# Budget: the whole inner run must stay well under 5 minutes on 2 shared CPU cores. Every preset
# runs every applicable test except these heavy ones (FX trace + forward + backward, and the prune
# contract, which prunes at every feature index and trains each pruned copy), which run on one
# preset per family; the others share their code paths (same encoder, same layouts, same heads:
# caformer's MLP head, swin's head_norm_first, hiera's units, sam2's block overrides, hvt's seq,
# mvitv2's fused transitions, maxvit's conv stem and MBConv blocks)
# and differ in numbers and in the mixers inside the stages (FX keeps a stage as one call).
HEAVY_TESTS = ("test_model_forward_fx", "test_model_backward_fx", "test_prune_intermediate_layers_contract")
REPRESENTATIVES = ("hfactory_caformer_s18", "hfactory_hiera_tiny_224", "hfactory_sam2_hiera_tiny",
                   "hfactory_swin_tiny_patch4_window7_224", "hfactory_pvt_v2_b0", "hfactory_hvt_ti_1",
                   "hfactory_mvitv2_tiny", "hfactory_maxvit_tiny_tf_224")


def lookup(table: dict, test: str, model: str) -> Optional[str]:
    """The reason ``table`` gives for ``(test, model)``, or None."""
    for (name, pattern), reason in table.items():
        if name == test and fnmatch.fnmatch(model, pattern):
            return reason
    return None


def why_not(test: str, model: str) -> Optional[str]:
    """Why ``test`` does not run on ``model`` in the inner run (None: it runs)."""
    reason = lookup(EXCLUDED, test, model)
    if reason is not None:
        return reason
    if test in HEAVY_TESTS and model not in REPRESENTATIVES:
        return "budget: heavy test, run on one preset per family (REPRESENTATIVES)"
    return None
