"""Per-block overrides inside a stage (``stages.N.blocks``): selection by index, range and
pattern, what they replace, where their errors point, and what the plan and modules make of them."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import hfactory
from hfactory import PlanError, load_spec, resolve
from hfactory.spec.io import dump_spec
from hfactory.spec.model import BlockOverride


def _stage(**over):
    return {"embedding": 32, "depth": 6, "token_mixer": {"kind": "window_attention", "window_size": 4}, **over}


def _spec(stage_overrides=None, **top):
    data = {"name": "tiny", "img_size": 32, "num_classes": 5, "defaults": {"dim_head": 8},
            "stages": [{"embedding": 16, "depth": 1, "downsample": {"kind": "conv", "patch_size": 4},
                        "token_mixer": "pooling"},
                       {**_stage(), **({"blocks": stage_overrides} if stage_overrides else {})}], **top}
    return load_spec(data)


@pytest.mark.parametrize("selector, depth, expected", [
    ({"at": 2}, 6, [2]), ({"at": [0, -1]}, 6, [0, 5]), ({"at": [-6, 5]}, 6, [0, 5]),
    ({"range": [1, 4]}, 6, [1, 2, 3]), ({"range": [-2, 6]}, 6, [4, 5]),
    ({"every": 2}, 6, [0, 2, 4]), ({"every": 2, "offset": 1}, 6, [1, 3, 5]), ({"every": 4, "offset": 3}, 6, [3]),
])
def test_selection(selector, depth, expected):
    assert BlockOverride.model_validate({**selector, "drop_path": 0.0}).selects(depth, "x") == expected


def test_overrides_replace_the_blocks_components_and_rates():
    spec = _spec([{"at": [1, -1], "token_mixer": "attention"},
                  {"every": 2, "offset": 1, "drop_path": 0.05},
                  {"at": 5, "feedforward": {"kind": "mlp", "hidden_layer_multiplier": 2}}],
                 drop_path_rate=0.1)
    stage = resolve(spec).stages[1]
    assert [b.token_mixer["kind"] for b in stage.blocks] == ["window_attention", "attention"] + \
        ["window_attention"] * 3 + ["attention"]
    linear = [0.1 * i / 6 for i in range(1, 7)]  # 7 blocks in all; stage 1 has blocks 1..6
    assert stage.drop_path == pytest.approx([linear[0], 0.05, linear[2], 0.05, linear[4], 0.05])
    assert stage.blocks[5].feedforward["hidden_features"] == 64 and stage.blocks[4].feedforward is None
    assert "window_attention 4x4 shift 0 + attention@1,5" in str(resolve(spec))  # 4x4 grid: no shift

    model = hfactory.build(spec)
    blocks = model.stages[1].blocks
    assert type(blocks[1].token_mixer).__name__ == "Attention"
    assert type(blocks[2].token_mixer).__name__ == "WindowAttention"
    assert blocks[5].mlp.fc1.out_features == 64 and blocks[4].mlp.fc1.out_features == 128
    assert blocks[3].drop_path1.p == pytest.approx(0.05)
    # an attention block here has exactly the parameters of a stage of attention blocks
    plain = hfactory.build(_spec().with_changes({"stages.1.token_mixer": "attention"}))
    ours = {k: v.shape for k, v in blocks[1].state_dict().items()}
    assert ours == {k: v.shape for k, v in plain.stages[1].blocks[1].state_dict().items()}
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_later_overrides_win():
    stage = resolve(_spec([{"range": [0, 6], "token_mixer": "attention"}, {"at": 3, "token_mixer": "pooling"}]))
    kinds = [b.token_mixer["kind"] for b in stage.stages[1].blocks]
    assert kinds == ["attention"] * 3 + ["pooling"] + ["attention"] * 2


def test_errors_name_the_override():
    with pytest.raises(PlanError, match="block 6 is outside the stage's 6 blocks") as err:
        resolve(_spec([{"at": [1, 6], "token_mixer": "attention"}]))
    assert err.value.loc == "stages.1.blocks.0.at"
    with pytest.raises(PlanError, match="selects none") as err:
        resolve(_spec([{"at": 0, "drop_path": 0.1}, {"range": [4, 2], "drop_path": 0.0}]))
    assert err.value.loc == "stages.1.blocks.1"
    with pytest.raises(ValidationError, match="exactly one of at"):
        _spec([{"token_mixer": "attention"}])
    with pytest.raises(ValidationError, match="exactly one of at"):
        _spec([{"at": 1, "every": 2, "token_mixer": "attention"}])
    with pytest.raises(ValidationError, match="at least one of"):
        _spec([{"at": 1}])
    with pytest.raises(ValidationError, match="unknown token_mixer 'atention'"):
        _spec([{"at": 1, "token_mixer": "atention"}])
    # a component the stage's layout cannot take is refused at the override's location
    seq = _spec([{"at": 1, "token_mixer": "pooling"}]).with_changes(
        {"stages.1.downsample": {"kind": "max_pool_1d"}, "stages.1.embedding": 16,
         "stages.1.token_mixer": "attention"})
    with pytest.raises(PlanError, match="'pooling' works on grid") as err:
        resolve(seq)
    assert err.value.loc == "stages.1.blocks.0.token_mixer"


def test_an_override_that_crosses_mask_units_is_named_by_the_mae_verdict():
    data = load_spec("examples/mae_digits.yaml").model_dump(mode="json", exclude_none=True)
    assert resolve(load_spec(data)).mae_compatible
    data["stages"][2]["blocks"] = [{"at": 1, "token_mixer": {"kind": "attention", "rotary": True}}]
    plan = resolve(load_spec(data))
    assert not plan.mae_compatible
    assert plan.mae_incompatibility.startswith("stages.2.token_mixer: (block 1) attention -- rotary")


def test_overrides_round_trip_through_yaml():
    spec = _spec([{"at": [1, -1], "token_mixer": {"kind": "attention", "qkv_bias": False}},
                  {"every": 3, "offset": 2, "drop_path": 0.0}])
    again = load_spec(dump_spec(spec))
    assert again == spec and resolve(again) == resolve(spec)


def test_with_changes_addresses_an_entry_by_position():
    """``stages.N.blocks.K.<field>`` changes one entry (``*``: all), its component options too,
    and the plan sees it; what matches nothing is named with the valid range or keys."""
    from hfactory.errors import OverrideError

    spec = _spec([{"at": [1], "token_mixer": "attention"},
                  {"every": 2, "token_mixer": {"kind": "window_attention", "window_size": 4}}])
    changed = spec.with_changes({"stages.1.blocks.0.at": [0, 5], "stages.1.blocks.1.token_mixer.window_size": 2,
                                 "stages.1.blocks.*.drop_path": 0.0})
    blocks = resolve(changed).stages[1].blocks
    # entry 1 (every 2nd block from 0) comes later, so it wins at block 0
    assert [b.token_mixer["kind"] for b in blocks] == ["window_attention"] * 5 + ["attention"]
    assert [list(b.token_mixer["window_size"]) for b in blocks[:5]] == [[2, 2], [4, 4], [2, 2], [4, 4], [2, 2]]
    assert spec.stages[1].blocks[0].at == [1]  # the original is untouched
    for change, where, says in [
        ({"stages.1.blocks.2.at": 0}, "stages.1.blocks.2", "the stage has 2 (0-1)"),
        ({"stages.1.blocks.first.at": 0}, "stages.1.blocks.first", "an entry index (0-1) or '*'"),
        ({"stages.1.blocks.0.window": 2}, "stages.1.blocks.0.window", "valid: at, drop_path, every"),
        ({"stages.0.blocks.0.at": 0}, "stages.0.blocks.0", "no per-block overrides"),
        ({"stages.1.blocks.0.token_mixer.window_size": 2}, "stages.1.blocks.0.token_mixer.window_size",
         "'attention' has no option 'window_size'"),
    ]:
        with pytest.raises(OverrideError) as err:
            spec.with_changes(change)
        assert err.value.path == where and says in str(err.value), (change, str(err.value))
