"""Pure-PyTorch implementations: the readable math, the CPU fallback and the kernels' contract."""
from . import divergences  # noqa: F401,E402  (one module per loss family)
from . import sparse  # noqa: F401,E402
from . import relational  # noqa: F401,E402
from . import attention  # noqa: F401,E402
