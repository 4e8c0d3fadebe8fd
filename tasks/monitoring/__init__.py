"""Monitoring a released champion on the events that arrive after it.

Pure computations behind ``shoprank monitor`` (the flow wires them):

* :mod:`tasks.monitoring.realised`: the champion's realised quality per calendar day, scored by
  :mod:`models.metrics` on the requests a shop front end sends (a live session each);
* :mod:`tasks.monitoring.drift`: drift checks between the champion's training events and the new
  events (event-type, category and price distributions, popularity of the top items), and the
  same values per day;
* :mod:`tasks.monitoring.expectations`: the Great Expectations suite
  ``expectations/monitoring.json`` on the shares of events from unknown users and on unknown items;
* :mod:`tasks.monitoring.verdict`: the decay check and the lines ``shoprank monitor`` prints;
* :mod:`tasks.monitoring.plot`: a PNG of realised quality and drift per day.

Thresholds live in :class:`tasks.monitoring.settings.MonitorSettings`.
"""
