"""Great Expectations 1.x checks at stage boundaries.

Each stage describes its data as a pandas frame (one row per file, with a ``path`` column) and a
list of :class:`Rule`; :func:`check_frame` validates it with an ephemeral GE context and raises
:class:`~unetops.errors.UnetopsError` naming the first offending file and the rule it broke, so
the stage stops before writing anything. GE is imported lazily: its import costs ~2 s.
"""

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from unetops.errors import UnetopsError


@dataclass(frozen=True)
class Rule:
    """One expectation: a GE expectation class name, its arguments, and the rule in words."""

    description: str
    expectation: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@functools.cache
def _batch_definition():
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    asset = context.data_sources.add_pandas("unetops").add_dataframe_asset("frame")
    return asset.add_batch_definition_whole_dataframe("whole")


def check_frame(frame: pd.DataFrame, rules: list[Rule], what: str) -> None:
    """Validate ``frame`` against ``rules``; raise on the first failure, naming file and rule.

    ``what`` names the whole table (e.g. ``data/split.csv``) for rules that no single row breaks.
    """
    if frame.empty:
        raise UnetopsError(f"{what}: no cases (expect at least one row)")
    # GE logs every metric computation at INFO (one module resets its own level), so mute it.
    logging.disable(logging.INFO)
    try:
        import great_expectations.expectations as gxe

        batch = _batch_definition().get_batch(
            batch_parameters={"dataframe": frame.reset_index(drop=True)})
        results = [(rule, batch.validate(getattr(gxe, rule.expectation)(**rule.kwargs),
                                         result_format="COMPLETE")) for rule in rules]
    finally:
        logging.disable(logging.NOTSET)
    for rule, result in results:
        if result.success:
            continue
        rows = result.result.get("unexpected_index_list") or []
        where = what
        if rows and "path" in frame.columns:
            where = str(frame.reset_index(drop=True).loc[rows[0], "path"])
        kind = result.expectation_config.type
        raise UnetopsError(f"{where}: {rule.description} ({kind})")
