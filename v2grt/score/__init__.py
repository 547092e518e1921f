"""Scoring a dispatch journal: did the fleet deliver the service it was paid for? (docs/services.md section 7)

``score_journal(journal_dir, service, **opts) -> dict`` (JSON-ready) and ``v2grt score JOURNAL --service ...``:
per settlement period, from the journal's recorded frequency and delivered power, the time within the
tolerance band around the required response, the response start and full-delivery times after each
excursion, energy delivered versus required, SoC-floor breaches and availability; for a regulation
signal (``--service reg``) PJM's composite performance score.
"""

from v2grt.score.cli import add_parser
from v2grt.score.core import parse_duration_s, score_journal, score_series
from v2grt.score.load import load_series
from v2grt.score.pjm import score_regulation
from v2grt.score.series import Series

__all__ = ["Series", "add_parser", "load_series", "parse_duration_s", "score_journal", "score_regulation",
           "score_series"]
