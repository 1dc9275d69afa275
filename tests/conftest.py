import os

# The kernel tests run the Triton code through its CPU interpreter, which Triton only enables
# for kernels decorated after this is set: it must precede any import of `kernels`.
os.environ["TRITON_INTERPRET"] = "1"
