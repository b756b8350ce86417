"""Browsable evaluation reports: one self-contained HTML page that opens from disk (no server, no network) with
the corpus metrics and their bootstrap intervals at the top and one row per image (or question) below:
thumbnail, reference(s), prediction(s) with the words that differ from the reference marked, per-sample scores;
sortable by any score and filterable in the page, rows rendered as the page scrolls."""

from medcap.report.build import (ReportOptions, System, caption_report, evaluation_report, marked_words,
                                 report_options, sample_rows, scoring_outputs, vqa_report)

__all__ = ["ReportOptions", "System", "caption_report", "evaluation_report", "marked_words", "report_options",
           "sample_rows", "scoring_outputs", "vqa_report"]
