"""Ordinary Python values in a checkpoint tree, encoded without pickle.

Hyper-parameters and configs hold paths, enums, sets, dataclasses, datetimes, argparse
namespaces and OmegaConf containers. ``torch.save`` pickles them, so loading runs whatever code
the file names. Here each becomes a small tagged JSON node of plain data.

**Nothing in a file chooses code to run.** Decoding builds only:

- a fixed list of stdlib value types (``pathlib`` paths, ``set``/``frozenset``,
  ``datetime``/``date``/``time``/``timedelta``, ``argparse.Namespace``);
- OmegaConf containers, from plain containers through ``OmegaConf.create``; an interpolation
  that calls a resolver (``${oc.env:AWS_SECRET_ACCESS_KEY}``, any custom resolver) comes back as
  literal text, so a file cannot make the loading process read its environment or run a
  resolver; interpolations between the config's own nodes (``${model.dim}``) still resolve;
- members of ``Enum`` classes and instances of dataclasses whose ``module:qualname`` the user
  allowlisted (``allowed_classes`` on the manager and the Lightning plugin). A name is looked up
  only when it is on that list, in modules the program already imported, without running
  import hooks or module ``__getattr__`` (``inspect.getattr_static``); no constructor runs (an
  enum member is looked up by name, a dataclass instance made with ``object.__new__`` and its
  fields set directly). Any other class comes back in plain form (the enum's value, the
  dataclass's fields as a dict), with a warning naming the option.

A value that names code to call (``functools.partial``, a function, a class) cannot be encoded
that way. Rebuilding it would hand the file a way to run code, so it is refused here.
``hparams_text`` turns such values in hyper-parameters into their text form, with a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import inspect
import logging
import pathlib
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

log = logging.getLogger("elastic_resume")

_PATHS: dict[str, type[pathlib.PurePath]] = {
    "Path": pathlib.Path, "PurePosixPath": pathlib.PurePosixPath, "PureWindowsPath": pathlib.PureWindowsPath,
}
#: Classes a checkpoint may name as a *type* (Lightning stores ``type(hparams)`` for OmegaConf
#: hyper-parameters and calls it on load): only these, since calling a named class is running code.
TYPE_ALLOWLIST = {
    "omegaconf.dictconfig:DictConfig", "omegaconf.listconfig:ListConfig", "builtins:dict",
    "lightning.fabric.utilities.data:AttributeDict", "lightning_fabric.utilities.data:AttributeDict",
    "lightning.pytorch.utilities.parsing:AttributeDict", "pytorch_lightning.utilities.parsing:AttributeDict",
}

Child = Callable[[Any, str], Any]  # encode or decode one nested value (path for messages)


def _class_ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def allowed_class_names(classes: Iterable[str | type] | None, option: str = "allowed_classes") -> frozenset[str]:
    """The user's allowlist as ``module:qualname`` names (classes or their names)."""
    if classes is None:
        return frozenset()
    if isinstance(classes, (str, type)):
        raise ConfigError(f"{option} must be a list of classes or 'module:QualName' names, not {classes!r}")
    names = set()
    for c in classes:
        if isinstance(c, type):
            names.add(_class_ref(c))
        elif isinstance(c, str) and c.count(":") == 1 and all(c.split(":")):
            names.add(c)
        else:
            raise ConfigError(f"{option}: {c!r} is neither a class nor a 'module:QualName' name")
    return frozenset(names)


@dataclass(frozen=True)
class DecodeRules:
    """What decoding may rebuild (``allowed``: the user's classes by ``module:qualname``) and
    whether it says when a value comes back in plain form (not while only verifying)."""

    allowed: frozenset[str] = frozenset()
    warn: bool = True

    def note(self, msg: str, *args: Any) -> None:
        if self.warn:
            log.warning(msg, *args)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _static_class(ref: Any) -> type | None:
    """The class ``module:qualname`` names in an already imported module, looked up without
    importing anything or running a hook (``__getattr__`` of a module or class)."""
    if not isinstance(ref, str) or ref.count(":") != 1 or len(ref) > 300:
        return None
    module_name, qualname = ref.split(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if obj is None or part.startswith("__"):
            return None
        obj = inspect.getattr_static(obj, part, None)
    return obj if isinstance(obj, type) else None


def allowed_class(ref: Any, rules: DecodeRules) -> type | None:
    """Only a name on the user's allowlist is ever looked up."""
    return _static_class(ref) if isinstance(ref, str) and ref in rules.allowed else None


def allowed_classes_present(names: frozenset[str]) -> list[type]:
    """The allowlisted classes this program has imported (looked up as decoding does)."""
    return [cls for name in sorted(names) if (cls := _static_class(name)) is not None]


_RESOLVER_HINT = re.compile(r"\$\{")


def _calls_resolver(text: str, fail: Callable[[str], Exception]) -> bool:
    """Whether OmegaConf would call a resolver to read ``text`` (checked with its own grammar)."""
    if not _RESOLVER_HINT.search(text):
        return False
    from .._omegaconf_compat import UnparsableValue, calls_resolver

    try:
        return calls_resolver(text)
    except UnparsableValue as e:
        raise fail(f"OmegaConf value {text[:80]!r} does not parse: {e}") from None


def _literal(text: str) -> str:
    """``text`` escaped so that OmegaConf reads it back as exactly these characters."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def _inert(node: Any, fail: Callable[[str], Exception], escaped: list[str]) -> Any:
    """A decoded OmegaConf container in which no value calls a resolver."""
    if isinstance(node, dict):
        return {k: _inert(v, fail, escaped) for k, v in node.items()}
    if isinstance(node, list):
        return [_inert(v, fail, escaped) for v in node]
    if isinstance(node, str) and _calls_resolver(node, fail):
        escaped.append(node)
        return _literal(node)
    return node


def is_omegaconf(value: Any) -> bool:
    omegaconf = sys.modules.get("omegaconf")  # only a program that uses OmegaConf can hold one
    return omegaconf is not None and isinstance(value, omegaconf.Container)


def encode_value(value: Any, child: Child, path: str) -> Any:
    """The node for ``value``, or ``NotImplemented`` if it is none of the types above."""
    if isinstance(value, enum.Enum):  # before int/str: IntEnum and StrEnum are both
        return {"enum": [_class_ref(type(value)), value.name, child(value.value, f"{path}.value")]}
    if isinstance(value, pathlib.PurePath):
        if isinstance(value, pathlib.Path):
            kind = "Path"  # PosixPath or WindowsPath: a concrete path of the loading system
        else:
            kind = "PureWindowsPath" if isinstance(value, pathlib.PureWindowsPath) else "PurePosixPath"
        return {"path": [kind, str(value)]}
    if isinstance(value, (set, frozenset)):
        items = sorted(value, key=repr)  # a stable order, so equal sets save equal bytes
        return {"fset" if isinstance(value, frozenset) else "set": [child(v, f"{path}{{{v!r}}}") for v in items]}
    if isinstance(value, dt.datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"time": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, argparse.Namespace):
        return {"ns": [[k, child(v, f"{path}.{k}")] for k, v in vars(value).items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [[f.name, child(getattr(value, f.name), f"{path}.{f.name}")] for f in dataclasses.fields(value)]
        return {"dc": [_class_ref(type(value)), fields]}
    if is_omegaconf(value):
        from omegaconf import OmegaConf

        return {"omc": child(OmegaConf.to_container(value, resolve=False), f"{path}(omegaconf)")}
    if isinstance(value, type) and _class_ref(value) in TYPE_ALLOWLIST:
        return {"type": _class_ref(value)}
    return NotImplemented


def _pairs(payload: Any, fail: Callable[[str], Exception]) -> list[tuple[str, Any]]:
    if not isinstance(payload, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in payload):
        raise fail("attribute list is not a list of [name, value] pairs")
    return [(p[0], p[1]) for p in payload]


def decode_value(tag: str, payload: Any, child: Callable[[Any], Any], fail: Callable[[str], Exception],
                 rules: DecodeRules) -> Any:
    """The value of a node tagged ``tag``, or ``NotImplemented`` for a tag not defined here.
    ``payload`` is untrusted: every shape is checked, and ``fail`` makes the error."""
    if tag == "path":
        if not (isinstance(payload, list) and len(payload) == 2 and payload[0] in _PATHS and isinstance(payload[1], str)):
            raise fail("bad path node")
        return _PATHS[payload[0]](payload[1])
    if tag in ("set", "fset"):
        if not isinstance(payload, list):
            raise fail("bad set node")
        items = [child(v) for v in payload]
        try:
            return frozenset(items) if tag == "fset" else set(items)
        except TypeError:
            if not all(isinstance(i, dict) or _hashable(i) for i in items):
                raise fail("set holds an unhashable value") from None
            # Instances of classes not allowlisted came back as dicts of their fields: a list.
            rules.note("a set holds values of classes not in allowed_classes: it comes back as a list")
            return items
    if tag in ("datetime", "date", "time"):
        if not isinstance(payload, str) or len(payload) > 64:
            raise fail(f"bad {tag} node")
        parse: Callable[[str], Any] = {"datetime": dt.datetime.fromisoformat, "date": dt.date.fromisoformat,
                                       "time": dt.time.fromisoformat}[tag]
        return parse(payload)
    if tag == "timedelta":
        if not (isinstance(payload, list) and len(payload) == 3 and all(type(v) is int for v in payload)):
            raise fail("bad timedelta node")
        return dt.timedelta(days=payload[0], seconds=payload[1], microseconds=payload[2])
    if tag == "ns":
        return argparse.Namespace(**{k: child(v) for k, v in _pairs(payload, fail)})
    if tag == "enum":
        if not (isinstance(payload, list) and len(payload) == 3 and isinstance(payload[1], str)):
            raise fail("bad enum node")
        value = child(payload[2])
        cls = allowed_class(payload[0], rules)
        if cls is not None and issubclass(cls, enum.Enum) and payload[1] in cls.__members__:
            return cls.__members__[payload[1]]
        rules.note("enum %s is not in allowed_classes (or not imported): its member %s comes back as its value %r",
                   str(payload[0])[:120], payload[1][:60], value)
        return value
    if tag == "dc":
        if not (isinstance(payload, list) and len(payload) == 2):
            raise fail("bad dataclass node")
        fields = {k: child(v) for k, v in _pairs(payload[1], fail)}
        cls = allowed_class(payload[0], rules)
        if cls is not None and dataclasses.is_dataclass(cls) and {f.name for f in dataclasses.fields(cls)} == set(fields):
            obj = object.__new__(cls)  # no __init__/__post_init__: the file runs no code
            for k, v in fields.items():
                object.__setattr__(obj, k, v)  # frozen dataclasses too
            return obj
        rules.note("dataclass %s is not in allowed_classes (or not imported, or its fields changed): it comes back "
                   "as a dict", str(payload[0])[:120])
        return fields
    if tag == "omc":
        container = child(payload)
        try:
            from omegaconf import OmegaConf
        except ImportError:
            log.warning("an OmegaConf config comes back as a plain container: omegaconf is not installed")
            return container
        escaped: list[str] = []
        inert = _inert(container, fail, escaped)
        if escaped:
            rules.note("%d OmegaConf value(s) calling a resolver come back as literal text (a checkpoint never "
                       "resolves against this process's environment), e.g. %r", len(escaped), escaped[0][:80])
        try:
            return OmegaConf.create(inert)
        except Exception as e:  # noqa: BLE001 - omegaconf's errors (GrammarParseError, ...) on untrusted text
            raise fail(f"OmegaConf config does not load: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    if tag == "type":
        cls = _static_class(payload) if payload in TYPE_ALLOWLIST else None
        if cls is None and payload in TYPE_ALLOWLIST:
            cls = dict  # e.g. omegaconf's DictConfig where omegaconf is not loaded: a dict is what it holds
        if cls is None:
            raise fail(f"type {str(payload)[:80]!r} is not one a checkpoint may name")
        return cls
    return NotImplemented


def plain(value: Any) -> Any:
    """``value`` in the plain types ``torch.load(weights_only=True)`` accepts: a path as text,
    an enum as its value, a set as a sorted list, a date or time in ISO form, a timedelta in
    seconds, a namespace, dataclass or OmegaConf config as a dict, a NumPy array as a tensor
    (an exported ``.ckpt``)."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return [plain(v) for v in sorted(value, key=repr)]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, argparse.Namespace):
        return {k: plain(v) for k, v in vars(value).items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if is_omegaconf(value):
        from omegaconf import OmegaConf

        return plain(OmegaConf.to_container(value, resolve=False))
    if isinstance(value, type):
        return _class_ref(value)  # Lightning reads a text hparams_type as "an AttributeDict"
    if type(value).__module__ == "numpy" and hasattr(value, "__array__"):
        import torch  # numpy arrays (e.g. a saved NumPy RNG state) travel as tensors

        return torch.from_numpy(value.copy()) if value.ndim else value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value


def hparams_text(tree: Any, path: str, encodable: Callable[[Any, str], bool]) -> Any:
    """``tree`` (hyper-parameters) with every value that cannot be encoded replaced by its text
    form, each with a warning naming where it was. Saving must not fail in the middle of
    ``fit`` because a config holds a callable."""
    if isinstance(tree, dict) and not is_omegaconf(tree):
        return {k: hparams_text(v, f"{path}[{k!r}]", encodable) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not isinstance(tree, argparse.Namespace):
        items = [hparams_text(v, f"{path}[{i}]", encodable) for i, v in enumerate(tree)]
        return items if isinstance(tree, list) else tuple(items)
    if isinstance(tree, argparse.Namespace):
        return argparse.Namespace(**{k: hparams_text(v, f"{path}.{k}", encodable) for k, v in vars(tree).items()})
    if encodable(tree, path):
        return tree
    text = repr(tree)
    log.warning("hyper-parameter %s (%s) cannot be saved without pickle: its text form %s is saved instead",
                path, type(tree).__qualname__, text[:200])
    return text
