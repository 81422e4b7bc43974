"""Dataset profiles: the best settings found per dataset, applied to ``params.yaml``.

A profile is a partial ``params.yaml`` in ``profiles/<name>.yaml`` at the project root. Applying
one writes its values into ``params.yaml`` itself (comments and key order kept, by ruamel's
round-trip loader, as DVC does), so DVC sees the changed params, reruns exactly the stages that
read them, and ``dvc.lock`` records them: ``unetops profile drive && dvc repro`` rebuilds the
DRIVE row of the README's results table, and ``git diff params.yaml`` shows what it changed.
The same values can be tried without touching ``params.yaml`` as a DVC experiment:
``dvc exp run $(unetops profile drive --set-params)``.
"""

import io
from pathlib import Path

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from unetops.config import config_from_dict
from unetops.errors import UnetopsError
from unetops.io import write_text

PROFILES_DIR = "profiles"


def available(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / PROFILES_DIR).glob("*.yaml"))


def read_profile(root: Path, name: str) -> dict:
    path = root / PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available(root)) or "none"
        raise UnetopsError(f"{path}: no such profile (available: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UnetopsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UnetopsError(f"{path}: expected a mapping of params.yaml sections")
    return data


def flat_items(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``{"train": {"epochs": 3}}`` → ``[("train.epochs", 3)]``; lists are values."""
    items = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items.extend(flat_items(value, dotted + "."))
        else:
            items.append((dotted, value))
    return items


def merge_into(target: dict, overrides: dict) -> None:
    """Deep-merge ``overrides`` into ``target`` in place (ruamel maps keep their comments).

    Equal values are left untouched and lists are written in flow style, ``[4, 8, 16]``, as
    ``params.yaml`` writes them, so applying one profile and then another restores the file.
    """
    for key, value in overrides.items():
        if isinstance(value, dict) and value and isinstance(target.get(key), dict):
            merge_into(target[key], value)
        elif target.get(key) != value:
            target[key] = _flow_list(value) if isinstance(value, list) else value


def _flow_list(items: list) -> CommentedSeq:
    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def apply_profile(params_path: Path, name: str) -> list[tuple[str, object]]:
    """Write profile ``name`` into ``params_path``; the changed ``(dotted key, value)`` pairs.

    The merged params are validated as a whole before anything is written, so a profile that
    no longer matches the config schema fails with the offending key and leaves the file as it was.
    """
    params_path = Path(params_path)
    root = params_path.parent
    overrides = read_profile(root, name)
    round_trip = YAML()
    round_trip.preserve_quotes = True
    round_trip.width = 100
    round_trip.representer.add_representer(  # keep `null` written out, as params.yaml has it
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = round_trip.load(params_path.read_text()) if params_path.is_file() else {}
    before = dict(flat_items(yaml.safe_load(params_path.read_text()) or {})) \
        if params_path.is_file() else {}
    merge_into(document, overrides)
    buffer = io.StringIO()
    round_trip.dump(document, buffer)
    text = buffer.getvalue()
    config_from_dict(yaml.safe_load(text), root, source=f"{params_path.name} + profile {name}")
    write_text(params_path, text)
    return [(key, value) for key, value in flat_items(overrides) if before.get(key) != value]


def set_param_args(root: Path, name: str) -> list[str]:
    """The profile as ``dvc exp run`` arguments: ``-S key=value`` per leaf (YAML flow values)."""
    args = []
    for key, value in flat_items(read_profile(root, name)):
        rendered = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        rendered = rendered.removesuffix("\n...").removesuffix("...").strip()
        args += ["-S", f"{key}={rendered}"]
    return args
