"""Model names from the config file -> config dataclasses and modules.

``model.name`` is a built-in name (see :data:`MODELS`) or a user model given as an
import path ``"package.module:Class"``. ``model.params`` is plain YAML; it is checked
against the config dataclass's fields here, so every problem is reported with its
key path before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from typing import TYPE_CHECKING, Any

from streamtrain.models.configs import FMConfig, LinearConfig, LogisticConfig, MLPConfig, TransformerRegressorConfig
from streamtrain.streams.errors import StreamtrainError

if TYPE_CHECKING:
    from torch import nn

# built-in name -> (config class, module class's import path); the module (and torch) is imported when one is built
MODELS: dict[str, tuple[type, str]] = {
    "linear": (LinearConfig, "streamtrain.models.linear:Linear"),
    "logistic": (LogisticConfig, "streamtrain.models.logistic:Logistic"),
    "mlp": (MLPConfig, "streamtrain.models.mlp:MLP"),
    "transformer": (TransformerRegressorConfig, "streamtrain.models.transformer:TransformerRegressor"),
    "fm": (FMConfig, "streamtrain.models.fm:FM"),
}


class ModelSpecError(StreamtrainError):
    """``model.name`` does not name a usable model."""


class ModelConfigError(ModelSpecError):
    """``model.params`` is invalid; lists every problem with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid model config ({len(self.problems)} problem(s)):\n{lines}")


def resolve(name: str) -> tuple[type | None, type]:
    """(config class, module class) for a built-in name or a ``package.module:Class`` path.

    A user class's config class is its ``Config`` attribute (a dataclass); without
    one it is None and the class is constructed with keyword arguments.
    """
    if name in MODELS:
        config_cls, path = MODELS[name]
        module_name, _, attr = path.partition(":")
        return config_cls, getattr(importlib.import_module(module_name), attr)
    if ":" not in name:
        known = ", ".join(sorted(MODELS))
        raise ModelSpecError(f'unknown model {name!r}; built-in models are {known}, and user models are given as "package.module:Class"')
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise ModelSpecError(f'{name!r} is not an import path; write it as "package.module:Class"')
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error raised while importing user code
        raise ModelSpecError(
            f"cannot import module {module_name!r} for {name!r}: {type(exc).__name__}: {exc}; check the module is on PYTHONPATH"
        ) from exc
    obj: Any = module
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ModelSpecError(f"module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    from torch import nn

    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelSpecError(f"{name!r} is not a torch.nn.Module subclass (got {obj!r})")
    config_cls = getattr(obj, "Config", None)
    if config_cls is not None and not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise ModelSpecError(
            f"{name!r} has a Config attribute that is not a dataclass; make it a dataclass or remove it to pass params as keyword arguments"
        )
    return config_cls, obj


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the stream gives a model, filled into its config where it has the field and ``model.params`` does not say.

    ``in_features``: numbers (and their "was missing" marks, the last ``indicators`` of
    them); ``categorical``: fields, each a row of a shared table of ``buckets`` rows;
    ``outputs``: what the task needs (1 for regression and binary, the classes for
    multiclass), filled into ``num_classes`` or ``out_features``.
    """

    in_features: int
    categorical: int = 0
    buckets: int = 0
    indicators: int = 0
    classes: int = 0  # multiclass: the number of classes; 0 otherwise

    def fills(self) -> dict[str, int]:
        out = {"in_features": self.in_features, "indicators": self.indicators}
        if self.categorical:
            out.update(categorical=self.categorical, buckets=self.buckets)
        if self.classes:
            out.update(num_classes=self.classes, out_features=self.classes)
        return out


def make_config(name: str, params: dict, inputs: int | Inputs) -> object:
    """The config for model ``name`` built from ``params``, with what the stream gives filled in (:class:`Inputs`).

    Returns the config dataclass, or for a user class without ``Config`` the keyword
    arguments for its constructor. Raises :class:`ModelConfigError` listing every
    unknown key, wrongly typed value and failed validation.
    """
    inputs = inputs if isinstance(inputs, Inputs) else Inputs(int(inputs))
    config_cls, module_cls = (MODELS[name][0], None) if name in MODELS else resolve(name)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ModelConfigError([f"model.params: must be a mapping, got {params!r}"])
    params = dict(params)
    if config_cls is None:
        return _make_kwargs(module_cls, params, inputs)

    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    try:
        hints = typing.get_type_hints(config_cls)
    except (NameError, TypeError, AttributeError):  # unresolvable user annotations
        hints = {}
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    buildable = True  # False once a field has no usable value: then skip validate()
    for key, value in params.items():
        if key not in fields:
            known = ", ".join(fields)
            problems.append(f"model.params.{key}: unknown parameter; known: {known}")
            continue
        converted, problem = _convert(value, hints.get(key, Any))
        if problem:
            problems.append(f"model.params.{key}: {problem}")
            buildable = False
        else:
            kwargs[key] = converted
    for key, value in inputs.fills().items():
        unset = key not in params or (key == "in_features" and not params[key])  # in_features 0: from the stream
        if key in fields and unset and (value or key == "in_features"):
            kwargs[key] = value
    if "num_classes" in kwargs and "out_features" in kwargs and "out_features" not in params:
        kwargs.pop("out_features")  # out_features follows num_classes (the logistic model's own rule)
    for key, field in fields.items():
        no_default = field.default is dataclasses.MISSING
        given = key in params or key in kwargs
        if no_default and field.default_factory is dataclasses.MISSING and not given:
            problems.append(f"model.params.{key}: required parameter is missing")
            buildable = False
    if not buildable:
        raise ModelConfigError(problems)

    try:
        config = config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelConfigError([*problems, f"model.params: {exc}"]) from exc
    validate = getattr(config, "validate", None)
    if callable(validate):
        problems += [f"model.params.{p}" for p in validate()]
    if problems:
        raise ModelConfigError(problems)
    return config


def build_model(name: str, params: dict, inputs: int | Inputs) -> nn.Module:
    """The module for ``model.name`` / ``model.params`` taking what ``inputs`` says the stream gives."""
    config = make_config(name, params, inputs)
    _, module_cls = resolve(name)
    if isinstance(config, dict):
        try:
            return module_cls(**config)
        except TypeError as exc:
            raise ModelSpecError(f"model {name!r} cannot be built with params {sorted(config)}: {exc}") from exc
    return module_cls(config)


def output_size(model_config: object) -> int:
    """How many raw outputs the model built from ``model_config`` returns per sample."""
    if isinstance(model_config, dict):
        size = model_config.get("out_features")
    else:
        size = getattr(model_config, "out_features", None)
    if not isinstance(size, int):
        raise ModelSpecError(
            f"cannot tell the output size from model config {model_config!r}; give the model an int out_features parameter"
        )
    return size


def _make_kwargs(module_cls: type, params: dict, inputs: Inputs) -> dict:
    """Keyword arguments for a user class without ``Config``, checked against its signature."""
    signature = inspect.signature(module_cls)
    accepted = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    problems = []
    if not takes_any:
        known = ", ".join(accepted)
        problems += [f"model.params.{key}: unknown parameter; known: {known}" for key in params if key not in accepted]
    for key, value in inputs.fills().items():
        unset = key not in params or (key == "in_features" and not params[key])
        if key in accepted and unset and (value or key == "in_features"):
            params[key] = value
    problems += [
        f"model.params.{key}: required parameter is missing"
        for key, p in accepted.items()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and key not in params
    ]
    if problems:
        raise ModelConfigError(problems)
    return params


def _convert(value: Any, hint: Any) -> tuple[Any, str | None]:
    """``value`` as the field type ``hint`` wants, or a problem saying what was expected."""
    if hint is bool:
        if isinstance(value, bool):
            return value, None
        return None, f"must be a bool, got {value!r}"
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return None, f"must be an int, got {value!r}"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        return None, f"must be a number, got {value!r}"
    if hint is str:
        if isinstance(value, str):
            return value, None
        return None, f"must be a string, got {value!r}"
    if typing.get_origin(hint) is tuple:
        item = (typing.get_args(hint) or (Any,))[0]
        if not isinstance(value, (list, tuple)):
            return None, f"must be a list, got {value!r}"
        items = []
        for element in value:
            converted, problem = _convert(element, item)
            if problem:
                return None, f"must be a list of {_type_name(item)}, got {value!r}"
            items.append(converted)
        return tuple(items), None
    return value, None


def _type_name(hint: Any) -> str:
    return {bool: "bools", int: "ints", float: "numbers", str: "strings"}.get(hint, "values")
