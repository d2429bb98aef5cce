"""tljax: transfer learning for computer vision in JAX/Flax."""

__version__ = "0.1.0"

import importlib.util as _util
import os as _os

# gs:// through gcsfs rather than TensorFlow's filesystem (tljax.storage); etils reads this
# once, at its first path, so it is set before anything else imports etils.
if _util.find_spec("gcsfs") is not None:
    _os.environ.setdefault("EPATH_USE_TF", "false")
