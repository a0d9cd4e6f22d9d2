"""Settings declared once: dataclass fields that carry their help, and the absl flags made from them.

A run's configuration is a tree of frozen dataclasses (an experiment's config nests the
model's config and the trainer's :class:`~hmlstm_jax.training.TrainConfig`). Each leaf field
is declared once, with :func:`setting`; :func:`define_flags` turns every leaf into an absl flag
of the same name (so flagfiles are one ``--name=value`` per setting), and :func:`from_flags`
builds the config back from the parsed flags, running each dataclass's own validation.

    @dataclasses.dataclass(frozen=True)
    class Config:
      seq_len: int = setting(100, "Truncated-BPTT segment length.")
      train: TrainConfig = nested(TrainConfig)

    define_flags(Config)             # --seq_len, --learning_rate, ...
    config = from_flags(Config)      # after absl has parsed argv

Leaf names must be unique over the whole tree (they are the flag names). A field marked
``changeable=True`` may differ when a run resumes (e.g. ``num_epochs``, ``log_every``);
:func:`differences` names the others that differ from a saved configuration.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterator

from absl import flags


def setting(default: Any, help: str, *, choices: Any = None, changeable: bool = False,
            flag: bool = True) -> Any:
  """A dataclass field that is one setting of a run.

  Args:
    default: its default value (tuples for sequences).
    help: the flag's help text.
    choices: allowed values: a sequence, or a dict from the flag's strings to config values.
    changeable: it may differ when a run resumes from a checkpoint made with another value.
    flag: ``False`` for a field that is not set by the user (e.g. derived from the data).
  """
  return dataclasses.field(default=default, metadata={
      "help": help, "choices": choices, "changeable": changeable, "flag": flag})


def nested(cls: type) -> Any:
  """A field holding a nested config dataclass, defaulting to ``cls()``."""
  return dataclasses.field(default_factory=cls)


def _is_config(tp: Any) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaves(cls: type) -> Iterator[tuple[dataclasses.Field, Any]]:
  """Every leaf setting of a config class, depth first, as (field, resolved type)."""
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    tp = hints[field.name]
    if _is_config(tp):
      yield from leaves(tp)
    else:
      yield field, tp


def _base(tp: Any) -> tuple[Any, bool]:
  """``X | None`` → (X, True); X → (X, False)."""
  if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1:
      return args[0], True
  return tp, False


def define_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per leaf setting of ``cls`` (names must be unique)."""
  seen = set()
  for field, tp in leaves(cls):
    meta = field.metadata
    if not meta.get("flag", False):
      continue
    if field.name in seen:
      raise ValueError(f"setting {field.name!r} is declared twice in {cls.__name__}")
    seen.add(field.name)
    base, _ = _base(tp)
    default, help_, choices = field.default, meta["help"], meta["choices"]
    if choices is not None:
      names = list(choices) if isinstance(choices, dict) else [str(c) for c in choices]
      if isinstance(choices, dict):
        default = next(k for k, v in choices.items() if v == default)
      flags.DEFINE_enum(field.name, default, names, help_, flag_values=flag_values)
    elif base is bool:
      flags.DEFINE_bool(field.name, default, help_, flag_values=flag_values)
    elif base is int:
      flags.DEFINE_integer(field.name, default, help_, flag_values=flag_values)
    elif base is float:
      flags.DEFINE_float(field.name, default, help_, flag_values=flag_values)
    elif base is str:
      flags.DEFINE_string(field.name, default, help_, flag_values=flag_values)
    elif typing.get_origin(base) is tuple:
      flags.DEFINE_list(field.name, None if default is None else [str(v) for v in default], help_,
                        flag_values=flag_values)
    else:
      raise TypeError(f"setting {field.name!r}: no flag type for {tp}")


def _from_flag(field: dataclasses.Field, tp: Any, value: Any) -> Any:
  choices = field.metadata["choices"]
  if isinstance(choices, dict):
    return choices[value]
  base, _ = _base(tp)
  if choices is not None and base is not str:
    return next(c for c in choices if str(c) == value)
  if typing.get_origin(base) is tuple and value is not None:
    item = typing.get_args(base)[0]
    try:
      return tuple(item(v) for v in value)
    except ValueError as err:
      raise ValueError(f"{field.name}: {err}") from None
  return value


def build(cls: type, values: dict[str, Any]) -> Any:
  """``cls`` from leaf values by name (missing leaves take their defaults); validates."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for field in dataclasses.fields(cls):
    tp = hints[field.name]
    if _is_config(tp):
      kwargs[field.name] = build(tp, values)
    elif field.name in values:
      kwargs[field.name] = values[field.name]
  return cls(**kwargs)


def from_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> Any:
  """The config that the parsed flags describe. Raises ValueError on an invalid value."""
  values = {field.name: _from_flag(field, tp, flag_values[field.name].value)
            for field, tp in leaves(cls) if field.metadata.get("flag", False)}
  return build(cls, values)


def flat(config: Any) -> dict[str, Any]:
  """Leaf name → value of a config instance (tuples as lists: the JSON form)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in _values(config).items()}


def replace(config: Any, **changes: Any) -> Any:
  """A copy of ``config`` with leaf settings changed by name, wherever they are nested."""
  unknown = set(changes) - set(flat(config))
  if unknown:
    raise ValueError(f"unknown settings {sorted(unknown)} for {type(config).__name__}")
  return build(type(config), dict(_values(config), **changes))


def _values(config: Any) -> dict[str, Any]:
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    out.update(_values(value) if dataclasses.is_dataclass(value) else {field.name: value})
  return out


def differences(cls: type, saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
  """The settings (not ``changeable``) whose values differ, as 'name: saved → requested'.

  A setting missing from ``saved`` (added to the code after the run started) differs only
  when it is requested with another value than its default: at its default it is the
  behaviour the run had, so the run may resume.
  """
  out = []
  for field, _ in leaves(cls):
    if field.metadata.get("changeable") or field.name not in requested:
      continue
    if field.name not in saved:
      default = list(field.default) if isinstance(field.default, tuple) else field.default
      if requested[field.name] != default:
        out.append(f"{field.name}: (not set) → {requested[field.name]!r}")
    elif saved[field.name] != requested[field.name]:
      out.append(f"{field.name}: {saved[field.name]!r} → {requested[field.name]!r}")
  return out
