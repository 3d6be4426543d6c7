"""torch.compile for a model's networks: shared by training (``--compile``), sampling and evaluation.

Only the networks are compiled; the objective's math and its random draws stay eager, so a compiled model computes
the same bound and draws the same noise. ``mode`` is inductor's: ``reduce-overhead`` (and ``max-autotune``) replay
each network as CUDA graphs on a GPU, the lever where a step waits on Python and kernel launches (small networks,
and sampling: a 1000-step chain calls the network 1000 times at one fixed shape).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from elbox.errors import UserError

if TYPE_CHECKING:
    from elbox.objectives.base import ELBOModel

#: the modes that capture CUDA graphs (a replay reuses its output memory)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile(backend: str, mode: str) -> None:
    """Refuse, in one line, a backend torch.compile does not know and a mode with a backend other than inductor
    (torch passes ``mode=`` on to the backend, and only inductor takes one)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UserError(f"compile_backend={backend!r} is not known to torch.compile; choose one of {', '.join(known)}")
    if mode != "default" and backend != "inductor":
        raise UserError(f"compile_mode={mode!r} needs compile_backend='inductor' (not {backend!r}); drop "
                        f"--compile-mode or use --compile-backend inductor")


def compile_networks(model: ELBOModel, backend: str = "inductor", mode: str = "default") -> None:
    """torch.compile each network of the model in place (state-dict names unchanged). A model made of models
    (latent diffusion: a VAE and a DDPM) has its parts' networks compiled: a part's own forward is never called.
    On a CPU, reduce-overhead compiles as the default does (CUDA graphs need a GPU)."""
    from elbox.objectives.base import ELBOModel

    check_compile(backend, mode)
    for child in model.children():
        if isinstance(child, ELBOModel):
            compile_networks(child, backend, mode)
        elif any(True for _ in child.parameters()):
            child.compile(backend=backend, **({} if mode == "default" else {"mode": mode}))


def backend_failure(e: BaseException) -> str | None:
    """The one-line reason when ``e`` is torch.compile's backend failing at the first compiled call (a backend torch
    lists but cannot run here: tvm or openxla without their packages), else None. By the class's name, so that
    catching it needs no import of torch._dynamo."""
    if type(e).__name__ != "BackendCompilerFailed":
        return None
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__).rstrip(".")
    return f"--compile-backend {getattr(e, 'backend_name', '?')} failed at the first compiled call: {reason}"
