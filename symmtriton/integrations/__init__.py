"""Drop-ins that make other frameworks run their collectives on symmtriton (``megatron``: the
functions of Megatron-Core's ``torch_symm_triton`` and its global symmetric buffer)."""
