"""Stage ``download``: fetch ``data.dataset`` (mirror first, SHA256-verified) into ``data/raw``.

The whole of ``data/raw`` is built in a staging folder and swapped in only when every case is
converted, so an interrupted or failed run leaves the previous ``data/raw`` (or none) intact.
Archives stay cached in ``data/archives`` (not a DVC output) and are re-verified on every run.
"""

from unetops.config import Config
from unetops.console import log
from unetops.datasets import convert
from unetops.io import atomic_dir


def run(cfg: Config) -> None:
    """Write ``data/raw/{images,masks,fov}/<case>.png`` and ``data/raw/cases.csv``."""
    with atomic_dir(cfg.paths.raw) as staging:
        n_cases = convert(cfg, staging)
    log.info("download: %d %s cases in %s", n_cases, cfg.data.dataset, cfg.paths.rel(cfg.paths.raw))
