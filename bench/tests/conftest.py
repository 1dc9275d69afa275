"""The lab's tests run as the paper's suite runs (the Triton interpreter switched on before any
import of `kernels`, one thread) and share its fixtures."""
from tests.conftest import opened, script_state, tiny_data  # noqa: F401  (fixtures are found by name)
