"""Unit tests for models/: shapes, learning, state round trip, validation, registry.

Fast and CPU-only; the one CUDA test skips without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from streamtrain.models import (
    MODELS,
    MLPConfig,
    ModelConfigError,
    ModelSpecError,
    TransformerRegressor,
    TransformerRegressorConfig,
    build_model,
    make_config,
    output_size,
    resolve,
)
from streamtrain.models.linear import LinearConfig
from streamtrain.models.logistic import LogisticConfig
from streamtrain.streams.errors import StreamtrainError
from tests.user_model_fixture import KwargsNet, TinyNet

IN_FEATURES = 12

# Small but non-trivial params per built-in model; the transformer sees 6 steps of 2.
PARAMS: dict[str, dict] = {
    "linear": {"out_features": 2},
    "logistic": {"num_classes": 3},
    "mlp": {"hidden": [16, 8], "layer_norm": True, "dropout": 0.1, "activation": "gelu"},
    "transformer": {
        "d_in": 2,
        "d_model": 16,
        "nhead": 2,
        "num_layers": 1,
        "dim_feedforward": 32,
        "out_features": 3,
    },
    "fm": {"embedding_dim": 4, "out_features": 2},
}


def build(name: str, seed: int = 0, **overrides: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, {**PARAMS[name], **overrides}, IN_FEATURES)


# --------------------------------------------------------------------------- shapes


def test_every_builtin_is_covered() -> None:
    assert set(PARAMS) == set(MODELS)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name: str, batch: int) -> None:
    model = build(name)
    out = model(torch.randn(batch, IN_FEATURES))
    assert out.shape == (batch, output_size(model.config))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backward_reaches_every_parameter(name: str) -> None:
    model = build(name)
    model(torch.randn(8, IN_FEATURES)).pow(2).mean().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname


def test_logistic_outputs_one_logit_when_binary() -> None:
    assert LogisticConfig(in_features=3, num_classes=2).out_features == 1
    assert LogisticConfig(in_features=3, num_classes=5).out_features == 5
    model = build_model("logistic", {}, 3)
    assert model(torch.randn(4, 3)).shape == (4, 1)


def test_transformer_derives_seq_len_from_in_features() -> None:
    assert TransformerRegressorConfig(in_features=12, d_in=3).seq_len == 4
    assert TransformerRegressorConfig(seq_len=4, d_in=3).in_features == 12
    model = build_model("transformer", {"d_in": 3, "d_model": 8, "nhead": 2}, 12)
    assert isinstance(model, TransformerRegressor)
    assert model.config.seq_len == 4
    assert model(torch.randn(5, 12)).shape == (5, 1)


# --------------------------------------------------------------------------- learning


def _regression(n: int = 128) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    x = torch.randn(n, IN_FEATURES)
    y = x @ torch.randn(IN_FEATURES, 1) * 0.5
    return x, y, nn.MSELoss()


def _binary(n: int = 128) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    x = torch.randn(n, IN_FEATURES)
    y = (x @ torch.randn(IN_FEATURES, 1) > 0).float()
    return x, y, nn.BCEWithLogitsLoss()


def _multiclass(n: int = 128) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    x = torch.randn(n, IN_FEATURES)
    y = (x @ torch.randn(IN_FEATURES, 3)).argmax(dim=1)
    return x, y, nn.CrossEntropyLoss()


LEARNING_CASES = [
    ("linear", {}, _regression, 0.1),
    ("logistic", {}, _binary, 0.5),
    ("logistic", {"num_classes": 3}, _multiclass, 0.5),
    ("mlp", {"hidden": [32]}, _regression, 0.05),
    ("transformer", {**PARAMS["transformer"], "out_features": 1, "dropout": 0.0}, _regression, 0.01),
]


@pytest.mark.parametrize(
    ("name", "params", "problem", "lr"),
    LEARNING_CASES,
    ids=["linear", "logistic-binary", "logistic-multiclass", "mlp", "transformer"],
)
def test_sgd_steps_reduce_loss(name: str, params: dict, problem, lr: float) -> None:
    torch.manual_seed(0)
    x, y, loss_fn = problem()
    model = build_model(name, params, IN_FEATURES)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with torch.no_grad():
        initial = loss_fn(model(x), y).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    assert final < 0.5 * initial, (initial, final)


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_round_trip(name: str, tmp_path) -> None:
    source = build(name, seed=1).eval()
    torch.save(source.state_dict(), tmp_path / "model.pt")
    target = build(name, seed=2).eval()
    target.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.randn(8, IN_FEATURES)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_transformer_position_encoding_is_not_saved() -> None:
    model = build("transformer")
    assert "pos_encoding" in dict(model.named_buffers())
    assert "pos_encoding" not in model.state_dict()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LinearConfig(), "in_features: must be > 0, got 0"),
        (LinearConfig(in_features=3, out_features=0), "out_features: must be > 0, got 0"),
        (LogisticConfig(in_features=3, num_classes=1), "num_classes: must be >= 2, got 1"),
        (MLPConfig(in_features=3, hidden=(64, 0)), "hidden: every size must be > 0, got (64, 0)"),
        (MLPConfig(in_features=3, activation="swish"), "activation: must be one of relu, gelu, tanh, silu, got 'swish'"),
        (MLPConfig(in_features=3, dropout=1.0), "dropout: must be in [0, 1), got 1.0"),
        (TransformerRegressorConfig(), "seq_len: must be > 0 (or set in_features to derive it), got 0"),
        (TransformerRegressorConfig(seq_len=4, nhead=3), "nhead: must divide d_model=64, got 3"),
        (TransformerRegressorConfig(in_features=10, d_in=3), "in_features: must be a multiple of d_in=3, got 10"),
        (
            TransformerRegressorConfig(seq_len=5, d_in=2, in_features=12),
            "in_features: must equal seq_len * d_in = 5 * 2 = 10, got 12",
        ),
    ],
)
def test_validate_names_the_field(config: object, expected: str) -> None:
    assert expected in config.validate()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_valid_configs_have_no_problems(name: str) -> None:
    assert build(name).config.validate() == []


def test_constructor_raises_with_every_problem() -> None:
    config_cls, module_cls = resolve("mlp")
    with pytest.raises(ValueError, match=r"in_features: must be > 0.*hidden: every size"):
        module_cls(config_cls(in_features=0, hidden=(0,)))


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", sorted(MODELS))
def test_resolve_builtin(name: str) -> None:
    config_cls, module_cls = resolve(name)
    assert config_cls is MODELS[name][0] and f"{module_cls.__module__}:{module_cls.__name__}" == MODELS[name][1]


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ModelSpecError) as info:
        resolve("gpt")
    message = str(info.value)
    assert "'gpt'" in message
    for known in MODELS:
        assert known in message
    assert '"package.module:Class"' in message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tests.no_such_module:Net", "cannot import module 'tests.no_such_module'"),
        ("tests.user_model_fixture:Missing", "has no attribute 'Missing'"),
        ("tests.user_model_fixture:NotAModule", "is not a torch.nn.Module subclass"),
        (":TinyNet", "is not an import path"),
    ],
)
def test_bad_import_paths(name: str, expected: str) -> None:
    with pytest.raises(ModelSpecError, match=expected) as info:
        resolve(name)
    assert isinstance(info.value, StreamtrainError)


def test_import_error_is_named_and_chained() -> None:
    with pytest.raises(ModelSpecError, match="ModuleNotFoundError") as info:
        resolve("tests.no_such_module:Net")
    assert isinstance(info.value.__cause__, ImportError)


def test_user_model_with_config_by_import_path() -> None:
    name = "tests.user_model_fixture:TinyNet"
    assert resolve(name) == (TinyNet.Config, TinyNet)
    model = build_model(name, {"width": 3, "out_features": 2}, 5)
    assert isinstance(model, TinyNet)
    assert model.config == TinyNet.Config(in_features=5, width=3, out_features=2)
    assert model(torch.randn(4, 5)).shape == (4, 2)
    assert output_size(model.config) == 2


def test_user_config_validate_problems_are_prefixed() -> None:
    with pytest.raises(ModelConfigError) as info:
        make_config("tests.user_model_fixture:TinyNet", {"width": 0, "depth": 2}, 5)
    assert info.value.problems == [
        "model.params.depth: unknown parameter; known: in_features, width, out_features",
        "model.params.width: must be > 0, got 0",
    ]


def test_user_model_with_keyword_arguments() -> None:
    name = "tests.user_model_fixture:KwargsNet"
    assert resolve(name) == (None, KwargsNet)
    assert make_config(name, {"out_features": 2}, 5) == {"out_features": 2, "in_features": 5}
    model = build_model(name, {"out_features": 2}, 5)
    assert isinstance(model, KwargsNet)
    assert model(torch.randn(3, 5)).shape == (3, 2)
    with pytest.raises(ModelConfigError) as info:
        make_config(name, {"depth": 2}, 5)
    assert info.value.problems == ["model.params.depth: unknown parameter; known: in_features, out_features"]


# --------------------------------------------------------------------------- make_config


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("mlp", {"out_features": "abc"}, "model.params.out_features: must be an int, got 'abc'"),
        ("linear", {"out_features": True}, "model.params.out_features: must be an int, got True"),
        ("linear", {"bias": 1}, "model.params.bias: must be a bool, got 1"),
        ("mlp", {"hidden": [8, "x"]}, "model.params.hidden: must be a list of ints, got [8, 'x']"),
        ("mlp", {"hidden": 8}, "model.params.hidden: must be a list, got 8"),
        ("mlp", {"dropout": "0.1"}, "model.params.dropout: must be a number, got '0.1'"),
        ("mlp", {"activation": 3}, "model.params.activation: must be a string, got 3"),
        (
            "mlp",
            {"hiden": [8]},
            "model.params.hiden: unknown parameter; known: in_features, hidden, out_features, activation, dropout, layer_norm, "
            "categorical, buckets, embedding_dim, embedding_std, indicators",
        ),
        ("mlp", {"hidden": [8, 0]}, "model.params.hidden: every size must be > 0, got (8, 0)"),
        ("transformer", {"nhead": 5}, "model.params.nhead: must divide d_model=64, got 5"),
    ],
)
def test_make_config_problems_carry_key_paths(name: str, params: dict, expected: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        make_config(name, params, IN_FEATURES)
    assert expected in info.value.problems
    assert expected in str(info.value)


def test_make_config_gathers_every_problem() -> None:
    with pytest.raises(ModelConfigError) as info:
        make_config("mlp", {"hidden": [0], "dropout": 2, "colour": "red"}, IN_FEATURES)
    assert sorted(p.split(":")[0] for p in info.value.problems) == [
        "model.params.colour",
        "model.params.dropout",
        "model.params.hidden",
    ]


def test_make_config_converts_yaml_values() -> None:
    config = make_config("mlp", {"hidden": [8, 4], "dropout": 0}, IN_FEATURES)
    assert config == MLPConfig(in_features=IN_FEATURES, hidden=(8, 4), dropout=0.0)
    assert isinstance(config.dropout, float)


def test_make_config_fills_in_features_unless_set() -> None:
    assert make_config("linear", {}, 7).in_features == 7
    assert make_config("linear", {"in_features": 0}, 7).in_features == 7
    assert make_config("linear", {"in_features": 3}, 7).in_features == 3


def test_make_config_rejects_params_that_are_not_a_mapping() -> None:
    with pytest.raises(ModelConfigError, match=r"model\.params: must be a mapping"):
        make_config("mlp", [8, 4], IN_FEATURES)


def test_output_size() -> None:
    assert output_size(LogisticConfig(in_features=3, num_classes=2)) == 1
    assert output_size(LogisticConfig(in_features=3, num_classes=4)) == 4
    assert output_size({"in_features": 3, "out_features": 2}) == 2
    with pytest.raises(ModelSpecError, match="out_features"):
        output_size({"in_features": 3})


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_on_cuda(name: str) -> None:
    model = build(name).cuda()
    out = model(torch.randn(8, IN_FEATURES, device="cuda"))
    assert out.shape == (8, output_size(model.config))
    assert out.device.type == "cuda"


def test_the_mlps_activations_are_the_ones_its_config_accepts() -> None:
    from streamtrain.models.configs import ACTIVATION_NAMES
    from streamtrain.models.mlp import ACTIVATIONS

    assert tuple(ACTIVATIONS) == ACTIVATION_NAMES
