"""The PoolFormer-S12-style spec of ``poolformer_s12.yaml``, written in Python.

Run: python examples/poolformer_s12.py
"""

from hfactory import EncoderSpec, StageDefaults, StageSpec

spec = EncoderSpec(
    name="poolformer_s12_style",
    img_size=224,
    num_classes=1000,
    drop_path_rate=0.1,
    defaults=StageDefaults(
        token_mixer={"kind": "pooling", "pool_size": 3},
        norm={"kind": "groupnorm", "num_groups": 1},
        feedforward={"kind": "mlp", "hidden_layer_multiplier": 4, "activation": "gelu"},
        layer_scale=1e-5,
        downsample={"kind": "conv", "patch_size": 3, "stride": 2, "padding": 1},
    ),
    stages=[
        StageSpec(embedding=64, depth=2, downsample={"kind": "conv", "patch_size": 7, "stride": 4, "padding": 2}),
        StageSpec(embedding=128, depth=2),
        StageSpec(embedding=320, depth=6),
        StageSpec(embedding=512, depth=2),
    ],
)

if __name__ == "__main__":
    import hfactory

    print(hfactory.resolve(spec))
    model = hfactory.build_encoder(spec)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
