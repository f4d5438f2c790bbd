"""PyTorch transcriptions of the official code (LISA, LAVIS), shared by tests/ and bench/.

tests/ is on sys.path for both (pytest's rootdir conftest; bench scripts insert it), so
`from torch_refs import lisa as lisa_ref` works from either. Only torch and the standard library
here: the JAX side is what these references check.
"""
