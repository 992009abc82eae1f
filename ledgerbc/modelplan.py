"""Which model each chemistry of a study runs with, and which files are never sent to it (DESIGN §4, §5).

`init --model` (repeatable) takes one default model — a variant (`hac`, `sup@v5.0.0`), a released model
name (`dna_r10.4.1_e8.2_400bps_hac@v5.0.0`) or a model folder — and any number of per-chemistry models
`SELECTOR=MODEL`. A SELECTOR is a dorado chemistry name (`rna004_130bps`) or a run info key
(`FLO-PRO004RA|SQK-RNA004|4000`, the ledger's batch key); a key's own entry beats its chemistry's, which
beats the default. Every batch holds one key, so every batch runs one model.

With a variant, dorado resolves the model from the batch's data and refuses what it has no model for (one
call per refused key: `batch.py`). With an explicit model (a name or a folder), dorado checks only the
sample rate of the FIRST file in directory order and basecalls every other file with that model without
a word (docs/dorado-facts.md §2). So ledgerbc never sends a file to an explicit model that cannot serve it
(`chemistry.can_serve`: analyte and sample rate): `refusal` says why, and such files are failed at
admission (`scan`) and, for files admitted before the model was set, by the worker that claims them,
before any dorado call. Their error names the model, the chemistry and the fix.
"""
from __future__ import annotations

import functools
import os
from dataclasses import replace

from . import chemistry
from .errors import BadInput

DEFAULT_MODEL = "hac"
CHEMISTRY_NAMES = tuple(row.name for row in chemistry.CHEMISTRIES)


def parse_model_option(values, option: str = "--model") -> tuple[str | None, dict[str, str]]:
    """(default model or None when no value gives one, {selector: model}) from `--model` values: `MODEL` or
    `SELECTOR=MODEL`. A value whose left side is not a selector is a model (a folder's path may hold '='),
    but only if that path exists."""
    default, per_chemistry = None, {}
    for value in values:
        value = value.strip()
        selector, sep, model = value.partition("=")
        if sep and is_selector(selector):
            selector = normal_selector(selector)
            if not model:
                raise BadInput(f"{option} {value}: no model after '='. Give `{option} {selector}=MODEL`.")
            if per_chemistry.get(selector, model) != model:
                raise BadInput(f"{option} gives {selector} two models ({per_chemistry[selector]}, {model}). Give one.")
            per_chemistry[selector] = model
        elif sep and not os.path.exists(value):
            raise BadInput(
                f"{option} {value}: '{selector}' is neither a dorado chemistry name ({', '.join(CHEMISTRY_NAMES)}) "
                f"nor a run info key FLOWCELL|KIT|RATE. Give `{option} CHEMISTRY=MODEL`, or a model that exists.")
        elif not value:
            raise BadInput(f"{option} is empty. Give a model variant (hac), a model name or a model folder.")
        else:
            if default not in (None, value):
                raise BadInput(f"{option} gives two default models ({default}, {value}). Give one, and "
                               f"`{option} CHEMISTRY=MODEL` for the chemistries that need another.")
            default = value
    return default, per_chemistry


def is_selector(text: str) -> bool:
    if text.lower() in CHEMISTRY_NAMES:
        return True
    try:
        chemistry.RunInfoKey.parse(text)
    except ValueError:
        return False
    return True


def normal_selector(text: str) -> str:
    """A chemistry name in dorado's (lower) case, a run info key upper-cased, as the ledger stores keys."""
    if text.lower() in CHEMISTRY_NAMES:
        return text.lower()
    return chemistry.RunInfoKey.parse(text).key


@functools.lru_cache(maxsize=64)
def spec(model: str) -> chemistry.ModelSpec:
    """`chemistry.parse_model`, plus, for a model folder, its config.toml `[run_info]` sample rate and
    sample type, which dorado reads and which win over what the folder's name says."""
    parsed = chemistry.parse_model(model)
    if parsed.kind != "path":
        return parsed
    try:
        import tomllib

        with open(os.path.join(model, "config.toml"), "rb") as fh:
            run_info = tomllib.load(fh).get("run_info", {})
    except (OSError, ValueError, ImportError):
        return parsed
    rate, sample_type = run_info.get("sample_rate"), run_info.get("sample_type")
    if isinstance(rate, int) and rate > 0:
        parsed = replace(parsed, sample_rate=rate)
    if isinstance(sample_type, str) and sample_type:
        parsed = replace(parsed, analyte="rna" if sample_type.upper().startswith("RNA") else "dna")
    return parsed


def _pick(default: str, per_chemistry: dict[str, str], key: str | None) -> str:
    if key is None:
        return default
    if key in per_chemistry:
        return per_chemistry[key]
    return per_chemistry.get(chemistry.resolve(key).name, default)


def _plan(settings) -> tuple[str, dict[str, str]]:
    return settings.model, dict(getattr(settings, "chemistry_models", None) or {})


def model_for(settings, key: str | None) -> str:
    """The model argument dorado is given for a batch of chemistry key `key` under `settings`."""
    return choose_model(*_plan(settings), key)


def choose_model(default: str, per_chemistry: dict[str, str], key: str | None) -> str:
    """The model for key `key` (a file whose read groups have several keys, "A;B": their one model when
    they agree; else the default, and `refusal` refuses it)."""
    picks = {_pick(default, per_chemistry, part) for part in _parts(key)}
    return picks.pop() if len(picks) == 1 else default


def _parts(key: str | None) -> list[str | None]:
    return key.split(";") if key else [None]


def refusal(settings, key: str | None) -> str | None:
    """Why files of chemistry key `key` must not be sent to the study's model for them, or None.

    Only explicit models (names, folders) are checked: with a variant dorado resolves the chemistry itself
    and refuses, at start and writing nothing, what it has no model for."""
    default, per_chemistry = _plan(settings)
    parts = _parts(key)
    picks = sorted({_pick(default, per_chemistry, part) for part in parts})
    if len(picks) > 1:
        return (f"its read groups ({', '.join(parts)}) are given different models ({', '.join(picks)}), and one "
                "dorado call runs one model: never sent to dorado. Basecall this file in a study of its own")
    model = picks[0]
    wanted = spec(model)
    if wanted.kind == "variant":
        return None
    if key is None:
        return (f"its run info was never read (admitted by an older ledgerbc), so whether model {model} can "
                "basecall it is unknown: never sent to dorado. `ledgerbc retry --all-failed` reads it")
    for part in parts:
        chem = chemistry.resolve(part)
        ok, why = chemistry.can_serve(wanted, chem)
        if not ok:
            selector = chem.name if chem.name != chemistry.UNKNOWN_CHEMISTRY else part
            return (f"{why}, run info {part}: never sent to that model (dorado would basecall it with it without "
                    f"a word). Give chemistry {selector} a model (`ledgerbc settings --set-model '{selector}=MODEL'`), "
                    "then `ledgerbc retry --all-failed`")
    return None


def problems(default: str, per_chemistry: dict[str, str], option: str = "--model") -> list[str]:
    """What is wrong with a model plan, one line each: models dorado refuses to parse or has dropped, and
    per-chemistry models that cannot serve the chemistry they are given for."""
    out = []
    for selector, model in [(None, default)] + sorted(per_chemistry.items()):
        wanted = spec(model)
        where = f"{option} {model}" if selector is None else f"{option} {selector}={model}"
        if wanted.errors:
            out.append(f"{where}: dorado refuses it ({wanted.errors[0]}). Give a variant such as hac or sup@v5.0.0, "
                       "a released model name, or a model folder.")
            continue
        if wanted.deprecated:
            out.append(f"{where}: {chemistry.deprecated_model_error(wanted.name)}.")
            continue
        if selector is None or wanted.kind == "variant":
            continue
        chem = chemistry.resolve(_representative_key(selector))
        ok, why = chemistry.can_serve(wanted, chem)
        if not ok:
            out.append(f"{where}: that model cannot basecall {chem.name} ({why}). Give {selector} a model of its "
                       "analyte and sample rate.")
    return out


def _representative_key(selector: str) -> str:
    """A run info key of `selector` (a key, or one of the flow cell x kit pairs of a chemistry name)."""
    for row in chemistry.CHEMISTRIES:
        if row.name == selector:
            flowcells, kits = row.kit_sets[0]
            return chemistry.RunInfoKey(flowcells[0], kits[0], row.sample_rate).key
    return selector


def describe(settings) -> str:
    """One line: the study's models, e.g. `hac; rna004_130bps=rna004_130bps_sup@v5.1.0`."""
    default, per_chemistry = _plan(settings)
    return "; ".join([default] + [f"{s}={m}" for s, m in sorted(per_chemistry.items())])
