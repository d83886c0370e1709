"""Watching served versions: Prometheus over the servers' metrics, the prediction log, drift, feedback.

prometheus.py   a Prometheus server scraping what `dlops serve` started; its query API
predictions.py  reading the prediction log the handlers write
drift.py        a window of the log against the version's reference profile, with Evidently
feedback.py     true answers joined to logged ones: the version's live quality
runs.py         each check an MLflow run in the `monitoring` experiment, linked to the version
page.py         `dlops monitor`: the figures over time as pictures, in one HTML page
"""


class MonitorError(RuntimeError):
    """A check that cannot be made, and why (the CLI prints it and exits non-zero)."""
