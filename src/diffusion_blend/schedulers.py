"""Diffusers schedulers by short name: the one table that ``--scheduler`` at the CLI and the lab's samplers read."""

from __future__ import annotations

#: Short names for the usual diffusers schedulers; any diffusers scheduler class name works too.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class of a short name (``ddim``, any case) or a class name (``DDIMScheduler``)."""
    import diffusers

    class_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and class_name.endswith("Scheduler")):
        raise ValueError(f"unknown scheduler {name!r} (try {', '.join(SCHEDULERS)} or a class name)")
    return cls
