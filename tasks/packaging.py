"""Where :class:`ShoprankPyfunc` lived before ``tasks/`` was grouped by stage.

Versions registered before the pyfunc was logged as models-from-code hold a pickled
``tasks.packaging.ShoprankPyfunc``; this module keeps that name importable so that they still
load. New code imports :mod:`tasks.release.packaging`.
"""

from tasks.release.packaging import ShoprankPyfunc

__all__ = ["ShoprankPyfunc"]
