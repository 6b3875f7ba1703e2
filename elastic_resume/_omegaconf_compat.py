"""Every touch of an OmegaConf internal: reading a value's interpolations with OmegaConf's own
grammar (``omegaconf.grammar_parser`` and its generated ANTLR parser), so that a checkpoint's
config never calls a resolver in the loading process. Written for omegaconf 2.3; the parser's
context class names are those of its grammar file, stable since 2.1."""

from __future__ import annotations

from typing import Any


class UnparsableValue(ValueError):
    """OmegaConf's grammar refuses the text (it would fail when the config is created)."""


def calls_resolver(text: str) -> bool:
    """Whether OmegaConf would call a resolver (``${oc.env:X}``, ``${name:...}``, a resolver
    whose name is itself an interpolation) to read ``text``. Raises :class:`UnparsableValue`."""
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

    try:
        tree = grammar_parser.parse(text)
    except Exception as e:  # noqa: BLE001 - GrammarParseError and antlr's own, on untrusted text
        raise UnparsableValue(type(e).__name__) from None
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            return True
        stack.extend(node.getChildren() if hasattr(node, "getChildren") else ())
    return False
