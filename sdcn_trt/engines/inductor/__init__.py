"""The inductor backend: AOTInductor packages per network (plan: GPU-free keys and settings; build: compile and first load in a child; child: a child process and its end in words; runner: the cache and the Runner)."""
from sdcn_trt.engines.inductor.runner import InductorRunner

__all__ = ["InductorRunner"]
