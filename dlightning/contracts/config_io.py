"""The one config loader and override grammar, for every config of the project.

Training, shard building and the degradation presets all load through :func:`load_config`: the
schema is a dataclass, YAML files merge over its defaults in order, then ``key=value`` overrides
apply. The override grammar is the same everywhere:

- dotted keys address nested sections: ``optim.lr=1e-4``;
- integers address list items: ``data.sources.0.path=/data/reds`` (an index equal to the list's
  length appends a new item with the schema's defaults);
- values are parsed by OmegaConf's grammar (``null``, numbers, ``[a, b]`` lists, ``{k: v}`` maps)
  and checked against the field's type.

An unknown key anywhere (in a file or an override) is a :class:`~dlightning.errors.ConfigError`
that names the key and the closest valid one. Dataclass ``__post_init__`` checks run when the
merged config becomes dataclasses, so every derived setting is resolved once, at load time.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlightning.errors import ConfigError


def check_choice(section: str, key: str, value: object, choices: Sequence[object]) -> None:
    """Raise ConfigError when ``value`` is not one of ``choices``, naming ``section.key``."""
    if value not in choices:
        raise ConfigError(f"{section}.{key}={value!r} is not valid; choose one of {list(choices)}")


def check_range(section: str, key: str, value: float, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise ConfigError when ``value`` lies outside [low, high] (or (low, high] with ``low_open``)."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{section}.{key}={value!r} is out of range; it must lie in {bounds}")


# ------------------------------------------------------------------------------------------ key checks
EXTRA_KEYS_ATTR = "__extra_keys__"
"""A schema dataclass may set ``__extra_keys__ = (field, names)``: keys it does not define but that
``names()`` lists (e.g. the keyword arguments of ``lightning.Trainer``) are accepted at its level and
kept in its dict field ``field``. A typo still gets the closest key among both sets."""


def import_class_path(spec: dict[str, Any], key: str, base: type, kind: str, example: str) -> type:
    """The class named by ``spec["class_path"]`` (LightningCLI's ``{class_path, init_args}`` form), checked
    to be a subclass of ``base``.

    Args:
        spec: The config entry.
        key: Its dotted config key, for messages (e.g. ``trainer.callbacks.0``).
        base: The class it must derive from.
        kind: How messages name ``base`` (e.g. ``lightning.pytorch Logger``).
        example: A full class path shown as the fix when the import fails.

    Raises:
        ConfigError: The class cannot be imported or does not derive from ``base``.
    """
    import importlib

    module_name, _, class_name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}.class_path={spec['class_path']!r} cannot be imported ({err}); give the full "
                          f"path, e.g. {example}") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}.class_path={spec['class_path']!r} is not a {kind}")
    return cls


def _extra_keys(cls: Any) -> tuple[str, set[str]] | None:
    spec = getattr(cls, EXTRA_KEYS_ATTR, None) if dataclasses.is_dataclass(cls) else None
    return (spec[0], set(spec[1]())) if spec else None


def _route_extras(user: Any, cls: type) -> Any:
    """Move the extra keys of ``user`` (a plain dict for ``cls``) into its extra field, at every level."""
    if not isinstance(user, dict) or not dataclasses.is_dataclass(cls):
        return user
    types = _field_types(cls)
    extras = _extra_keys(cls)
    out: dict[str, Any] = {}
    for key, value in user.items():
        if key not in types and extras is not None and key in extras[1]:
            out.setdefault(extras[0], {})[key] = value
            continue
        sub = _element_dataclass(types[key]) if key in types and typing.get_origin(types[key]) is not dict else None
        if sub is not None and isinstance(value, list):
            value = [_route_extras(item, sub) for item in value]
        elif sub is not None:
            value = _route_extras(value, sub)
        out[key] = value
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _element_dataclass(annotation: Any) -> type | None:
    """The dataclass held by ``list[SomeDataclass]`` / ``SomeDataclass | None`` annotations, if any."""
    if dataclasses.is_dataclass(annotation):
        return annotation  # type: ignore[return-value]
    for arg in typing.get_args(annotation):
        found = _element_dataclass(arg)
        if found is not None:
            return found
    return None


def _unknown_key(path: str, key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    prefix = path[: -len(str(key))]
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{path}'{hint} Valid keys here: {sorted(valid)}")


def check_keys(user: Any, cls: type, prefix: str = "") -> None:
    """Raise ConfigError for the first key in ``user`` (a plain dict) that ``cls`` does not define."""
    if not isinstance(user, dict):
        return
    types = _field_types(cls)
    extras = _extra_keys(cls)
    for key, value in user.items():
        path = f"{prefix}{key}"
        if key not in types:
            valid = list(types) + sorted(extras[1] if extras else ())
            raise _unknown_key(path, str(key), valid)
        annotation = types[key]
        if typing.get_origin(annotation) is dict:
            continue
        sub = _element_dataclass(annotation)
        if sub is not None:
            _check_nested(value, sub, path)


def _check_nested(value: Any, sub: type, path: str) -> None:
    """Check a section value: one dict of ``sub``, or a list of them (items addressed by index)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_keys(item, sub, f"{path}.{i}.")
    else:
        check_keys(value, sub, f"{path}.")


# ------------------------------------------------------------------------------------------ overrides
def _parse_value(key: str, text: str) -> Any:
    """A value in OmegaConf's dot-list grammar (the same parser as ``OmegaConf.from_dotlist``)."""
    try:
        return OmegaConf.from_dotlist([f"value={text}"])["value"]
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot parse the value of override '{key}={text}': {err}") from err


def _list_default_item(node: ListConfig) -> Any:
    """A new list item with the schema's defaults (lists of dataclasses), or None."""
    element = node._metadata.element_type  # noqa: SLF001 - OmegaConf's only handle on the item type
    return OmegaConf.structured(element) if dataclasses.is_dataclass(element) else None


def _walk(root: DictConfig, key: str) -> str:
    """Check every segment of a dotted override key exists (appending a list item at index == length).

    Returns:
        The key to update: ``key`` itself, or with an extra key routed into its section's extra field.
    """
    node: Any = root
    walked = ""
    parts = key.split(".")
    for depth, part in enumerate(parts):
        path = f"{walked}{part}"
        last = depth == len(parts) - 1
        if isinstance(node, ListConfig):
            if not part.lstrip("-").isdigit():
                raise ConfigError(f"config key '{path}': '{walked.rstrip('.')}' is a list; address its items "
                                  f"by index, e.g. '{walked}0'")
            index = int(part)
            if index == len(node) and not last:
                item = _list_default_item(node)
                if item is None:
                    raise ConfigError(f"config key '{path}': cannot append a nested item to a list of plain "
                                      "values; set the whole list instead, e.g. key=[a,b]")
                node.append(item)
            elif not 0 <= index < len(node) and not (last and index == len(node)):
                raise ConfigError(f"config key '{path}': index {index} is out of range; "
                                  f"'{walked.rstrip('.')}' has {len(node)} item(s)")
            if index < len(node):
                node = node[index]
        elif isinstance(node, DictConfig):
            schema = OmegaConf.get_type(node)
            structured = dataclasses.is_dataclass(schema)
            extras = _extra_keys(schema)
            if structured and part not in node and extras is not None and part in extras[1]:
                return ".".join([*parts[:depth], extras[0], *parts[depth:]])
            if structured and part not in node:
                valid = [str(k) for k in node.keys()] + sorted(extras[1] if extras else ())
                raise _unknown_key(path, part, valid)
            node = node[part] if part in node else None
        else:
            raise ConfigError(f"config key '{path}': '{walked.rstrip('.')}' is a value, not a section")
        walked = f"{path}."
    return key


def _target_annotation(cls: Any, key: str) -> Any:
    """The type annotation of the field a dotted key addresses (None where the schema is untyped)."""
    annotation: Any = cls
    for part in key.split("."):
        if part.lstrip("-").isdigit():
            args = typing.get_args(annotation)
            annotation = args[0] if typing.get_origin(annotation) is list and args else None
        else:
            holder = _element_dataclass(annotation)
            if holder is None or typing.get_origin(annotation) is dict:
                return None
            annotation = _field_types(holder).get(part)
        if annotation is None:
            return None
    return annotation


def _check_value_keys(cls: Any, key: str, value: Any) -> None:
    """Check the keys inside a composite override value (``key=[{...}]`` or ``key={...}``)."""
    annotation = _target_annotation(cls, key)
    sub = _element_dataclass(annotation) if annotation is not None else None
    if sub is not None and typing.get_origin(annotation) is not dict:
        _check_nested(value, sub, key)


def apply_override(merged: DictConfig, item: str) -> None:
    """Apply one ``key=value`` override to ``merged`` in place (see the module docstring's grammar)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.lr=1e-4")
    key = _walk(merged, key)
    value = _parse_value(key, text)
    if isinstance(value, (DictConfig, ListConfig)):
        _check_value_keys(OmegaConf.get_type(merged), key, OmegaConf.to_container(value))
    try:
        OmegaConf.update(merged, key, value, merge=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"override '{item}': {_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ------------------------------------------------------------------------------------------ loading
def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file as a plain dict, with a clear error for a missing, malformed or non-mapping file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist; pass an existing YAML file")
    try:
        loaded = OmegaConf.load(file)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"config file {file} is not valid YAML: {_first_line(err)}") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {file} must hold a mapping at the top level")
    return OmegaConf.to_container(loaded, resolve=True)  # type: ignore[return-value]


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = (), *, cls: type,
                base: Any = None) -> Any:
    """Merge the schema defaults (or ``base``), YAML ``files`` in order, then ``key=value`` overrides.

    Args:
        files: YAML files; later files win.
        overrides: ``key=value`` strings in the grammar of this module.
        cls: The schema dataclass.
        base: An instance of ``cls`` to start from instead of its defaults.

    Returns:
        An instance of ``cls``, every section's ``__post_init__`` checks run.

    Raises:
        ConfigError: Unknown keys (with the closest valid key), unparsable or mistyped values,
            or values the schema's checks refuse.
    """
    layers = [_route_extras(load_yaml(f), cls) for f in files]
    for layer in layers:
        check_keys(layer, cls)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base if base is not None else cls), *layers)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration: {_first_line(err)}") from err
    assert isinstance(merged, DictConfig)
    for item in overrides:
        apply_override(merged, item)
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration: {_first_line(err)}") from err


def to_yaml(cfg: Any) -> str:
    """A config dataclass as YAML (written next to every checkpoint and into the run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_container(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain Python types (safe for ``torch.load(weights_only=True)`` and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_container(data: dict[str, Any], cls: type) -> Any:
    """Rebuild a config dataclass from :func:`to_container` output (e.g. read back from a checkpoint)."""
    data = _route_extras(data, cls)
    check_keys(data, cls)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"stored configuration does not fit {cls.__name__}: {_first_line(err)}") from err
