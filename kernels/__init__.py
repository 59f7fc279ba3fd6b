"""Triton kernels of are_fast (installed as ``are_fast.kernels``): one file per pass, launchers only here."""
from .kl_epilogue import kl_epilogue
from .logprob_epilogue import logprob_epilogue

__all__ = ["kl_epilogue", "logprob_epilogue"]
