"""The served model as MLflow *models-from-code*: the file MLflow runs to build the pyfunc.

:func:`tasks.release.packaging.save_pyfunc` logs this file (not a pickled instance) beside the
project's ``models`` and ``tasks`` folders (code paths). Loading a version runs it: it builds a
:class:`tasks.release.packaging.ShoprankPyfunc`, which then loads the version's serving bundle
artifact. No Python object is stored, so a version does not depend on the class layout of the code
that saved it, and MLflow does not warn about pickled models.
"""

from mlflow.models import set_model

from tasks.release.packaging import ShoprankPyfunc

set_model(ShoprankPyfunc())
