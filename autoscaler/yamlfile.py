"""YAML settings files validated by a pydantic model, every problem as `FILE:LINE: field.path: message`.

Shared by the placement policy and the serving spec: the line is found by walking the YAML node
tree along the error's field path (nested mappings and lists), so an error deep in the file points
at its own line, and a missing field points at the mapping that lacks it.
"""

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class SettingsError(ValueError):
    """A settings file that does not validate; one `FILE:LINE: field.path: message` line per problem."""


def read_mapping(path: str | Path) -> tuple[str, dict]:
    """(text, data) of a YAML file whose top level is a mapping; SettingsError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path}: no such file")
    text = path.read_text()
    return text, parse_mapping(text, str(path))


def parse_mapping(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SettingsError(f"{source}{line}: not valid YAML: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{source}:1: the file must be a mapping of settings, got {type(data).__name__}")
    return data


def validate(model: type[Model], data: dict, text: str, source: str) -> Model:
    """`model(**data)`, its validation errors located in `text`."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SettingsError(located(text, source, [(e["loc"], e["msg"]) for e in err.errors()])) from None


def located(text: str, source: str, problems: list[tuple[tuple, str]]) -> str:
    """One `SOURCE:LINE: a.b.0.c: message` line per (field path, message)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        root = None
    return "\n".join(f"{source}:{line_of(root, loc)}: {'.'.join(map(str, loc)) or '(top level)'}: {msg}"
                     for loc, msg in problems)


def line_of(node, loc: tuple) -> int:
    """1-based line of the deepest node along `loc` that exists (1 without a document)."""
    if node is None:
        return 1
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
